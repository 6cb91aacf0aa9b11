//! The startup rule that keeps a daemon from serving a network unauthenticated.

use std::net::SocketAddr;

use crate::token::ApiToken;

/// How a daemon may serve, as decided at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    /// A token is configured: every protected route requires it.
    Authenticated,
    /// Loopback bind with no token: open, for local development.
    OpenLoopback,
}

/// The daemon must not start. Displays as one line for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindPolicyError {
    /// Non-loopback address and no token.
    #[error(
        "refusing to listen on {addr} without an API token: set LLORCH_API_TOKEN or --api-token-file, or bind to a loopback address"
    )]
    TokenRequired {
        /// The address that was asked for.
        addr: SocketAddr,
    },
}

/// Decide whether the daemon may listen on `addr` with `token`.
///
/// Token length is enforced when the token is loaded ([`ApiToken::new`]), so
/// any token reaching here is acceptable. Loopback without a token is allowed;
/// the caller logs one warning for it.
pub fn check_bind_policy(
    addr: SocketAddr,
    token: Option<&ApiToken>,
) -> Result<BindMode, BindPolicyError> {
    match token {
        Some(_) => Ok(BindMode::Authenticated),
        None if addr.ip().is_loopback() => Ok(BindMode::OpenLoopback),
        None => Err(BindPolicyError::TokenRequired { addr }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_without_token_is_open() {
        for addr in ["127.0.0.1:8080", "127.8.9.1:1", "[::1]:8080"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(check_bind_policy(addr, None), Ok(BindMode::OpenLoopback));
        }
    }

    #[test]
    fn any_other_address_without_token_is_refused() {
        for addr in [
            "0.0.0.0:8080",
            "[::]:8080",
            "192.168.1.4:80",
            "10.0.0.1:9200",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let err = check_bind_policy(addr, None).unwrap_err();
            assert!(err.to_string().contains("refusing to listen"));
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn a_token_allows_any_address() {
        let token = ApiToken::new("0123456789abcdef".into()).unwrap();
        let addr: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(
            check_bind_policy(addr, Some(&token)),
            Ok(BindMode::Authenticated)
        );
    }
}
