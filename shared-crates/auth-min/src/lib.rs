//! Minimal, careful bearer-token authentication shared by every rbee daemon.
//!
//! - [`parse_bearer`]: strict `Authorization: Bearer <token>` parsing.
//! - [`ApiToken`] and [`load_token`]: the configured secret, from
//!   `--api-token-file`, `LLORCH_API_TOKEN` or `$CREDENTIALS_DIRECTORY/api-token`.
//! - [`Authenticator`]: constant-time verification over SHA-256 digests (the
//!   comparison never depends on the presented token's length) with runtime
//!   rotation and a grace window for the previous token.
//! - [`AuthLayer`]: the tower layer that guards every route except the public
//!   probes, answering 401 in the contract's error shape.
//! - [`check_bind_policy`]: refuses to serve a non-loopback address without a token.
//! - [`WithBearer`] and [`send_authenticated`]: the token on outgoing
//!   `reqwest` requests; during a rotation's grace window a call refused
//!   with 401 is sent again with the previous token.
//!
//! Logs and metrics only ever see the fingerprint ([`token_fp6`]), never the token.

mod authenticator;
mod bearer;
mod bind;
mod client;
mod fingerprint;
mod layer;
mod token;

pub use authenticator::{AuthFailure, AuthFailureKind, Authenticator, DEFAULT_ROTATION_GRACE};
pub use bearer::{parse_bearer, BearerError, MAX_AUTHORIZATION_BYTES};
pub use bind::{check_bind_policy, BindMode, BindPolicyError};
pub use client::{send_authenticated, WithBearer};
pub use fingerprint::{token_fp6, Fingerprint};
pub use layer::{
    AuthDecision, AuthLayer, AuthMetrics, AuthObserver, AuthService, Authenticated, PUBLIC_PATHS,
};
pub use token::{load_token, ApiToken, TokenError, TokenSources, MIN_TOKEN_CHARS};
