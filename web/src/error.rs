//! The one place where failures become HTTP answers: every error, from a route,
//! a guard or Rocket itself (through the default catcher), is
//! `{"error": {"code": <status>, "message": "..."}}`, the same shape the
//! inference HTTP API and `mnist.predict` use.

use mnistflow_nats::PredictError;
use rocket::http::{ContentType, Header, Status};
use rocket::response::{self, Responder, Response};
use rocket::{Request, catch};

/// An error answer: a status and a message meant for the person using the page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: Status,
    pub message: String,
    /// Sent as `Retry-After` (seconds), on answers worth retrying.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after: None }
    }

    /// The same error with a `Retry-After` of `seconds`.
    pub fn retry_after(mut self, seconds: Option<u32>) -> Self {
        self.retry_after = seconds;
        self
    }

    /// Remembers this error on the request so that the catcher Rocket calls
    /// after a failing guard can answer with its message, not a generic one.
    pub(crate) fn stash(self, req: &Request<'_>) -> (Status, Self) {
        // local_cache keeps the first value stored: the first failing guard's message wins.
        let _ = req.local_cache(|| StashedError(Some(self.clone())));
        (self.status, self)
    }
}

/// An error left on the request by a guard for the catcher.
#[derive(Debug, Clone)]
pub(crate) struct StashedError(pub Option<ApiError>);

impl<'r> Responder<'r, 'static> for ApiError {
    fn respond_to(self, _req: &'r Request<'_>) -> response::Result<'static> {
        let code = self.status.code;
        let body = serde_json::to_string(&PredictError::new(code, self.message))
            .unwrap_or_else(|_| format!("{{\"error\":{{\"code\":{code},\"message\":\"\"}}}}"));
        let mut response = Response::build();
        response.status(self.status).header(ContentType::JSON).sized_body(body.len(), std::io::Cursor::new(body));
        if self.status == Status::Unauthorized {
            response.header(Header::new("WWW-Authenticate", "Bearer realm=\"mnistflow admin\""));
        }
        if let Some(seconds) = self.retry_after {
            response.header(Header::new("Retry-After", seconds.to_string()));
        }
        response.ok()
    }
}

/// Answers every error Rocket raises (unknown route, failed guard, oversized
/// body) in the API's JSON shape, never with an HTML or debug page.
#[catch(default)]
pub(crate) fn default_catcher(status: Status, req: &Request<'_>) -> ApiError {
    if let Some(stashed) = req.local_cache(|| StashedError(None)).0.clone()
        && stashed.status == status
    {
        return stashed;
    }
    let message = match status.code {
        404 => "no such page or API route".to_owned(),
        413 => "request body too large".to_owned(),
        _ => status.reason_lossy().to_owned(),
    };
    ApiError::new(status, message)
}
