//! Security headers on every answer, pages, API and errors alike.
//!
//! The page is built to satisfy this policy: scripts and styles come only from
//! the server's own `/app.js` and `/app.css` (no inline code, no `'unsafe-inline'`),
//! the DOM is built without HTML strings (so Trusted Types can be required), and
//! nothing is loaded from another origin. Violations are reported to
//! `/api/csp-report` (counted in `mnistflow_web_csp_reports_total`).

use rocket::fairing::{Fairing, Info, Kind};
use rocket::http::Header;
use rocket::{Request, Response};

/// The Content-Security-Policy of every answer.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' blob:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'; require-trusted-types-for 'script'; report-uri /api/csp-report";

/// Adds the security headers.
pub(crate) struct SecurityHeaders;

#[rocket::async_trait]
impl Fairing for SecurityHeaders {
    fn info(&self) -> Info {
        Info { name: "Security headers", kind: Kind::Response }
    }

    async fn on_response<'r>(&self, req: &'r Request<'_>, res: &mut Response<'r>) {
        res.set_header(Header::new("Content-Security-Policy", CONTENT_SECURITY_POLICY));
        res.set_header(Header::new("X-Content-Type-Options", "nosniff"));
        res.set_header(Header::new("X-Frame-Options", "DENY"));
        res.set_header(Header::new("Referrer-Policy", "no-referrer"));
        res.set_header(Header::new("Cross-Origin-Opener-Policy", "same-origin"));
        res.set_header(Header::new("Cross-Origin-Resource-Policy", "same-origin"));
        res.set_header(Header::new("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=()"));
        if req.uri().path().starts_with("/api/") && !res.headers().contains("Cache-Control") {
            res.set_header(Header::new("Cache-Control", "no-store"));
        }
    }
}
