//! The client side: every daemon-to-daemon call sends the bearer token.

use crate::token::ApiToken;

/// Adds `Authorization: Bearer <token>` to an outgoing request.
///
/// ```no_run
/// use auth_min::{ApiToken, WithBearer};
/// # fn f(client: reqwest::Client, token: Option<ApiToken>) {
/// let request = client.get("http://127.0.0.1:9200/v1/workers/list").with_bearer(token.as_ref());
/// # }
/// ```
pub trait WithBearer {
    /// Attach the token, or leave the request as is when there is none
    /// (a peer running in open loopback mode).
    fn with_bearer(self, token: Option<&ApiToken>) -> Self;
}

impl WithBearer for reqwest::RequestBuilder {
    fn with_bearer(self, token: Option<&ApiToken>) -> Self {
        match token {
            Some(token) => self.header(http::header::AUTHORIZATION, token.bearer_header()),
            None => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_is_added_and_marked_sensitive() {
        let token = ApiToken::new("client-token-0123456789".into()).unwrap();
        let request = reqwest::Client::new()
            .get("http://127.0.0.1:1/")
            .with_bearer(Some(&token))
            .build()
            .unwrap();
        let value = &request.headers()[http::header::AUTHORIZATION];
        assert_eq!(value, "Bearer client-token-0123456789");
        assert!(value.is_sensitive());
    }

    #[test]
    fn no_token_adds_no_header() {
        let request = reqwest::Client::new()
            .get("http://127.0.0.1:1/")
            .with_bearer(None)
            .build()
            .unwrap();
        assert!(request.headers().get(http::header::AUTHORIZATION).is_none());
    }
}
