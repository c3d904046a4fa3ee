//! Credentials removed from text bound for an event or a log line.
//!
//! Commands are written by hand and events are shown on a public page, so any
//! text that may hold a URL (a mirror a command named, an undecodable payload,
//! an error message quoting either) passes through [`redact_credentials`] first.

use std::borrow::Cow;

/// The text with the user information of every `scheme://user:password@host`
/// replaced by `***` (`https://***@host/`). Text without credentials is
/// returned as it is, without a copy.
pub fn redact_credentials(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("://") {
        let authority_start = search + found + 3;
        let authority_len = text[authority_start..]
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | ',' | ']' | '}' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(text.len() - authority_start);
        let authority = &text[authority_start..authority_start + authority_len];
        if let Some(at) = authority.rfind('@') {
            out.push_str(&text[copied..authority_start]);
            out.push_str("***");
            copied = authority_start + at;
        }
        search = authority_start + authority_len;
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::redact_credentials;

    #[test]
    fn user_information_is_replaced_in_every_url() {
        let text = r#"{"mirrors":["https://alice:s3cret@mirror.example/mnist/","http://bob@other.example:8080/x"]}"#;
        let shown = redact_credentials(text);
        assert_eq!(shown, r#"{"mirrors":["https://***@mirror.example/mnist/","http://***@other.example:8080/x"]}"#);
        assert!(!shown.contains("s3cret") && !shown.contains("bob"));
    }

    #[test]
    fn text_without_credentials_is_untouched() {
        for text in
            ["https://mirror.example/mnist/", "mail me: a@b.example", "no url at all", "file:///data/mnist/", ""]
        {
            assert!(matches!(redact_credentials(text), std::borrow::Cow::Borrowed(t) if t == text), "{text}");
        }
    }

    #[test]
    fn an_unparsable_url_with_a_password_is_still_redacted() {
        assert_eq!(redact_credentials("https://u:pass@@host/"), "https://***@host/");
    }
}
