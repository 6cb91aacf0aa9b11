//! The client side: every daemon-to-daemon call sends the bearer token.

use crate::authenticator::Authenticator;
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

/// Send `request` with the daemon's current token; if the peer refuses it
/// with 401 while the previous token is still in its grace window, send it
/// once more with the previous token. A token rotation thus never fails a
/// call to a peer that has not reloaded yet, whichever daemon reloads
/// first. A request whose body cannot be copied (a stream) is sent once.
pub async fn send_authenticated(
    request: reqwest::RequestBuilder,
    auth: &Authenticator,
) -> reqwest::Result<reqwest::Response> {
    let fallback = auth.previous_bearer().and_then(|previous| {
        Some(
            request
                .try_clone()?
                .header(http::header::AUTHORIZATION, previous),
        )
    });
    let request = match auth.bearer() {
        Some(bearer) => request.header(http::header::AUTHORIZATION, bearer),
        None => request,
    };
    let response = request.send().await?;
    match fallback {
        Some(again) if response.status() == http::StatusCode::UNAUTHORIZED => again.send().await,
        _ => Ok(response),
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

    /// A peer on loopback that accepts what `peer` accepts and counts the
    /// requests it gets.
    async fn peer(peer: Authenticator) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&seen);
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |headers: http::HeaderMap, body: String| {
                let peer = peer.clone();
                let counter = std::sync::Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    match peer.verify(headers.get(http::header::AUTHORIZATION)) {
                        Ok(_) => (http::StatusCode::OK, body),
                        Err(_) => (http::StatusCode::UNAUTHORIZED, String::new()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    #[tokio::test]
    async fn a_rotated_daemon_reaches_a_peer_that_has_not_reloaded() {
        use std::sync::atomic::Ordering;
        let old = ApiToken::new("old-token-0123456789".into()).unwrap();
        let new = ApiToken::new("new-token-0123456789".into()).unwrap();
        let (url, seen) = peer(Authenticator::new(&old)).await;
        let client = reqwest::Client::new();

        let ours = Authenticator::new(&old);
        ours.rotate(&new, std::time::Duration::from_secs(60));
        let response = send_authenticated(client.post(&url).body("hello"), &ours)
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.text().await.unwrap(),
            "hello",
            "the body is sent again"
        );
        assert_eq!(
            seen.load(Ordering::SeqCst),
            2,
            "new token, then the old one"
        );

        // A peer that has reloaded takes the new token at once.
        let (url, seen) = peer(Authenticator::new(&new)).await;
        let response = send_authenticated(client.post(&url), &ours).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(seen.load(Ordering::SeqCst), 1);

        // After the grace window there is nothing to fall back to.
        let (url, seen) = peer(Authenticator::new(&old)).await;
        let expired = Authenticator::new(&old);
        expired.rotate(&new, std::time::Duration::ZERO);
        let response = send_authenticated(client.post(&url), &expired)
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(seen.load(Ordering::SeqCst), 1);
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
