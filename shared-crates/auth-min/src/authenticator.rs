//! Constant-time token verification with rotation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use parking_lot::RwLock;
use rbee_api::ErrorCode;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::bearer::{parse_bearer, BearerError};
use crate::fingerprint::Fingerprint;
use crate::token::ApiToken;

/// How long the previous token stays valid after a rotation, unless the
/// caller chooses otherwise.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(60);

/// Checks presented credentials against the accepted token set, and holds
/// the token this daemon sends to its peers.
///
/// Tokens are compared as SHA-256 digests with [`subtle`], so the time taken
/// depends neither on where the first differing byte is nor on the presented
/// token's length. Cloning is cheap; clones share the token set, so a
/// [`rotate`](Self::rotate) on one is seen by every layer holding another.
#[derive(Clone, Debug)]
pub struct Authenticator {
    tokens: Arc<RwLock<TokenSet>>,
}

#[derive(Debug, Default)]
struct TokenSet {
    current: Option<Accepted>,
    previous: Option<(Accepted, Instant)>,
}

#[derive(Debug, Clone)]
struct Accepted {
    digest: [u8; 32],
    fingerprint: Fingerprint,
    /// The token itself, for this daemon's own calls to its peers.
    token: ApiToken,
    /// `Bearer <token>`, built once (sensitive; cheap to clone).
    bearer: HeaderValue,
}

impl Accepted {
    fn of(token: &ApiToken) -> Self {
        Self {
            digest: Sha256::digest(token.expose().as_bytes()).into(),
            fingerprint: token.fingerprint().clone(),
            token: token.clone(),
            bearer: token.bearer_header(),
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No or malformed `Authorization` header.
    #[error("{0}")]
    Malformed(BearerError),
    /// A well-formed token that is not accepted.
    #[error("the API token is not valid")]
    Rejected {
        /// Fingerprint of the presented token, for the log.
        fingerprint: Fingerprint,
    },
}

/// The two kinds of failure operators tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailureKind {
    /// No credential was sent.
    Missing,
    /// A credential was sent but is malformed or not accepted.
    Invalid,
}

impl AuthFailureKind {
    /// `missing` or `invalid`: the label of `rbee_auth_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
        }
    }
}

impl AuthFailure {
    /// Missing or invalid.
    pub fn kind(&self) -> AuthFailureKind {
        match self {
            Self::Malformed(BearerError::Missing) => AuthFailureKind::Missing,
            _ => AuthFailureKind::Invalid,
        }
    }

    /// `MISSING_API_KEY` when nothing was presented, else `INVALID_API_KEY`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Malformed(BearerError::Missing) => ErrorCode::MissingApiKey,
            _ => ErrorCode::InvalidApiKey,
        }
    }

    /// `missing` or `invalid`: the label of `rbee_auth_failures_total`.
    pub fn metric_reason(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Fingerprint of the presented token, when one could be read.
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        match self {
            Self::Rejected { fingerprint } => Some(fingerprint),
            Self::Malformed(_) => None,
        }
    }
}

impl Authenticator {
    /// Accept every request: no token configured (loopback development only;
    /// see [`crate::check_bind_policy`]).
    pub fn open() -> Self {
        Self {
            tokens: Arc::new(RwLock::new(TokenSet::default())),
        }
    }

    /// Accept exactly `token`.
    pub fn new(token: &ApiToken) -> Self {
        Self {
            tokens: Arc::new(RwLock::new(TokenSet {
                current: Some(Accepted::of(token)),
                previous: None,
            })),
        }
    }

    /// [`new`](Self::new) for `Some`, [`open`](Self::open) for `None`.
    pub fn from_config(token: Option<&ApiToken>) -> Self {
        token.map_or_else(Self::open, Self::new)
    }

    /// True when no token is configured and every request passes.
    pub fn is_open(&self) -> bool {
        self.read().current.is_none()
    }

    /// Check an `Authorization` header now.
    ///
    /// `Ok(None)` in open mode, `Ok(Some(fingerprint))` for an accepted token.
    pub fn verify(&self, header: Option<&HeaderValue>) -> Result<Option<Fingerprint>, AuthFailure> {
        self.verify_at(header, Instant::now())
    }

    /// [`verify`](Self::verify) at an explicit time (tests, grace windows).
    pub fn verify_at(
        &self,
        header: Option<&HeaderValue>,
        now: Instant,
    ) -> Result<Option<Fingerprint>, AuthFailure> {
        let set = self.read();
        let Some(current) = &set.current else {
            return Ok(None);
        };
        let presented = parse_bearer(header).map_err(AuthFailure::Malformed)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let matches_current = digest.ct_eq(&current.digest);
        let (matches_previous, previous_valid) = match &set.previous {
            Some((previous, until)) => (digest.ct_eq(&previous.digest), now < *until),
            None => (0u8.ct_eq(&1u8), false),
        };
        if bool::from(matches_current) {
            return Ok(Some(current.fingerprint.clone()));
        }
        if bool::from(matches_previous) && previous_valid {
            if let Some((previous, _)) = &set.previous {
                return Ok(Some(previous.fingerprint.clone()));
            }
        }
        Err(AuthFailure::Rejected {
            fingerprint: Fingerprint::from_digest(&digest),
        })
    }

    /// The current token, for a daemon's calls to its peers (`None` in open
    /// mode).
    pub fn token(&self) -> Option<ApiToken> {
        self.read().current.as_ref().map(|c| c.token.clone())
    }

    /// `Authorization: Bearer <current token>` for an outgoing call.
    pub fn bearer(&self) -> Option<HeaderValue> {
        self.read().current.as_ref().map(|c| c.bearer.clone())
    }

    /// The previous token's header while its grace window lasts: a peer that
    /// has not reloaded yet still knows only that one, so a call it refuses
    /// with 401 is sent again with this ([`crate::send_authenticated`]).
    pub fn previous_bearer(&self) -> Option<HeaderValue> {
        let now = Instant::now();
        self.read()
            .previous
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(p, _)| p.bearer.clone())
    }

    /// Replace the accepted token. The previous one stays accepted for
    /// `grace`, so clients and peer daemons can switch without a failed
    /// request. Rotating to the same token changes nothing.
    pub fn rotate(&self, new: &ApiToken, grace: Duration) {
        self.rotate_at(new, grace, Instant::now());
    }

    /// [`rotate`](Self::rotate) at an explicit time.
    pub fn rotate_at(&self, new: &ApiToken, grace: Duration, now: Instant) {
        let accepted = Accepted::of(new);
        let mut set = self.tokens.write();
        if let Some(current) = set.current.take() {
            if bool::from(current.digest.ct_eq(&accepted.digest)) {
                set.current = Some(current);
                return;
            }
            set.previous = Some((current, now + grace));
        }
        tracing::info!(
            token_fp = %accepted.fingerprint,
            grace_s = grace.as_secs(),
            "API token rotated; the previous token stays valid during the grace window"
        );
        set.current = Some(accepted);
    }

    fn read(&self) -> parking_lot::RwLockReadGuard<'_, TokenSet> {
        // The set is replaced whole under the lock, so a poisoned lock still
        // holds a consistent value.
        self.tokens.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> ApiToken {
        ApiToken::new(s.to_owned()).unwrap()
    }

    fn bearer(s: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {s}")).unwrap()
    }

    const OLD: &str = "old-token-0123456789";
    const NEW: &str = "new-token-0123456789";

    #[test]
    fn open_mode_accepts_anything() {
        let auth = Authenticator::open();
        assert!(auth.is_open());
        assert_eq!(auth.verify(None), Ok(None));
    }

    #[test]
    fn accepts_the_configured_token_and_names_its_fingerprint() {
        let auth = Authenticator::new(&token(OLD));
        let fp = auth.verify(Some(&bearer(OLD))).unwrap().unwrap();
        assert_eq!(fp, Fingerprint::of(OLD));
    }

    #[test]
    fn missing_and_wrong_tokens_get_distinct_codes() {
        let auth = Authenticator::new(&token(OLD));
        let missing = auth.verify(None).unwrap_err();
        assert_eq!(missing.code(), ErrorCode::MissingApiKey);
        assert_eq!(missing.metric_reason(), "missing");
        let wrong = auth
            .verify(Some(&bearer("wrong-token-0123456789")))
            .unwrap_err();
        assert_eq!(wrong.code(), ErrorCode::InvalidApiKey);
        assert_eq!(
            wrong.fingerprint(),
            Some(&Fingerprint::of("wrong-token-0123456789"))
        );
        // A prefix of the right token is still wrong.
        assert!(auth.verify(Some(&bearer(&OLD[..10]))).is_err());
    }

    #[test]
    fn rotation_accepts_both_tokens_during_grace_then_only_the_new() {
        let auth = Authenticator::new(&token(OLD));
        let clone = auth.clone();
        let t0 = Instant::now();
        auth.rotate_at(&token(NEW), Duration::from_secs(60), t0);

        // Clones share the set.
        assert!(clone.verify_at(Some(&bearer(NEW)), t0).is_ok());
        assert!(clone
            .verify_at(Some(&bearer(OLD)), t0 + Duration::from_secs(59))
            .is_ok());
        assert!(clone
            .verify_at(Some(&bearer(OLD)), t0 + Duration::from_secs(60))
            .is_err());
        assert!(clone
            .verify_at(Some(&bearer(NEW)), t0 + Duration::from_secs(3600))
            .is_ok());
    }

    #[test]
    fn rotating_to_the_same_token_keeps_no_stale_previous() {
        let auth = Authenticator::new(&token(OLD));
        let t0 = Instant::now();
        auth.rotate_at(&token(NEW), Duration::from_secs(60), t0);
        auth.rotate_at(
            &token(NEW),
            Duration::from_secs(60),
            t0 + Duration::from_secs(1),
        );
        // The grace window of OLD is unchanged by the no-op rotation.
        assert!(auth
            .verify_at(Some(&bearer(OLD)), t0 + Duration::from_secs(30))
            .is_ok());
        assert!(auth
            .verify_at(Some(&bearer(OLD)), t0 + Duration::from_secs(61))
            .is_err());
    }
}
