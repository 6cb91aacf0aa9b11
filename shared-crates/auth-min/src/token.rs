//! The configured API token and where it comes from.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

use crate::bearer::MAX_AUTHORIZATION_BYTES;
use crate::fingerprint::Fingerprint;

/// Shortest token a daemon will accept.
pub const MIN_TOKEN_CHARS: usize = 16;
/// Longest token that still fits an `Authorization` header.
const MAX_TOKEN_BYTES: usize = MAX_AUTHORIZATION_BYTES - "Bearer ".len();

/// The shared secret, kept in a [`SecretString`]; `Debug` prints only its fingerprint.
#[derive(Clone)]
pub struct ApiToken {
    secret: SecretString,
    fingerprint: Fingerprint,
}

impl ApiToken {
    /// Validate a token: at least [`MIN_TOKEN_CHARS`] characters of visible
    /// ASCII (so it can always be sent back in a header), at most 8 KiB.
    pub fn new(value: String) -> Result<Self, TokenError> {
        let trimmed = value.trim_ascii();
        if trimmed.is_empty() {
            return Err(TokenError::Empty);
        }
        if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadCharacters);
        }
        if trimmed.len() < MIN_TOKEN_CHARS {
            return Err(TokenError::TooShort { len: trimmed.len() });
        }
        if trimmed.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong);
        }
        let fingerprint = Fingerprint::of(trimmed);
        Ok(Self {
            secret: SecretString::from(trimmed.to_owned()),
            fingerprint,
        })
    }

    /// The token's fingerprint, safe to log.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// `Authorization: Bearer <token>`, marked sensitive so that it is never
    /// logged, for clients that build their own requests.
    pub fn bearer_header(&self) -> http::HeaderValue {
        let mut value = http::HeaderValue::try_from(format!("Bearer {}", self.expose()))
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }

    /// The raw secret, for the places that must send or hash it.
    pub(crate) fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    /// Write the token to a file readable only by its owner (0600), for a
    /// child process's `--api-token-file`. The file is replaced whole (a
    /// new file renamed over the old), so a reader never sees half a token.
    /// The token leaves this crate only this way and in outgoing
    /// `Authorization` headers.
    pub fn write_private_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut staging = path.as_os_str().to_owned();
        staging.push(".new");
        let staging = std::path::PathBuf::from(staging);
        let _ = std::fs::remove_file(&staging);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)?;
        file.write_all(self.expose().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staging, path)
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiToken({})", self.fingerprint)
    }
}

/// Why no usable token could be loaded. Each variant displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read API token file {path}: {source}")]
    Io {
        /// The file as configured.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The token file (after resolving symlinks) is readable or writable by group or others.
    #[error(
        "API token file {path} has mode {mode:04o}; it must not be accessible to group or others (chmod 600)"
    )]
    InsecurePermissions {
        /// The resolved file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token is empty.
    #[error("the API token is empty")]
    Empty,
    /// The token is shorter than [`MIN_TOKEN_CHARS`].
    #[error("the API token is {len} characters long; at least 16 are required")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// The token is longer than fits a header.
    #[error("the API token is longer than 8 KiB")]
    TooLong,
    /// Whitespace inside, control characters or non-ASCII.
    #[error("the API token may only contain visible ASCII characters")]
    BadCharacters,
}

/// Where a daemon may find its token, in order of precedence:
/// `--api-token-file`, then `$CREDENTIALS_DIRECTORY/api-token` (systemd
/// `LoadCredential=`), then `LLORCH_API_TOKEN`.
#[derive(Debug, Clone, Default)]
pub struct TokenSources {
    /// `--api-token-file`.
    pub file: Option<PathBuf>,
    /// `$CREDENTIALS_DIRECTORY`.
    pub credentials_dir: Option<PathBuf>,
    /// `LLORCH_API_TOKEN`.
    pub env_token: Option<String>,
}

impl TokenSources {
    /// Sources from the process environment plus the `--api-token-file` flag.
    pub fn from_process_env(file: Option<PathBuf>) -> Self {
        Self {
            file,
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            env_token: std::env::var("LLORCH_API_TOKEN")
                .ok()
                .filter(|v| !v.is_empty()),
        }
    }
}

/// Load the token from the first configured source; `Ok(None)` when none is.
pub fn load_token(sources: &TokenSources) -> Result<Option<ApiToken>, TokenError> {
    if let Some(path) = &sources.file {
        return read_token_file(path, true).map(Some);
    }
    if let Some(dir) = &sources.credentials_dir {
        let path = dir.join("api-token");
        if path.exists() {
            // systemd owns this directory and its modes; no permission check.
            return read_token_file(&path, false).map(Some);
        }
    }
    match &sources.env_token {
        Some(value) => ApiToken::new(value.clone()).map(Some),
        None => Ok(None),
    }
}

fn read_token_file(path: &Path, check_mode: bool) -> Result<ApiToken, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    // Kubernetes mounts Secrets as symlinks into a timestamped directory:
    // the permissions that matter are those of the file at the end.
    let resolved = std::fs::canonicalize(path).map_err(io)?;
    if check_mode {
        let mode = std::fs::metadata(&resolved)
            .map_err(io)?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o066 != 0 {
            return Err(TokenError::InsecurePermissions {
                path: resolved,
                mode,
            });
        }
    }
    let mut contents = String::new();
    std::fs::File::open(&resolved)
        .map_err(io)?
        .take(MAX_TOKEN_BYTES as u64 + 64)
        .read_to_string(&mut contents)
        .map_err(io)?;
    ApiToken::new(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const GOOD: &str = "0123456789abcdef-good-token";

    fn write(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_file_is_replaced_whole_and_stays_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        ApiToken::new("first-token-0123456789".into())
            .unwrap()
            .write_private_file(&path)
            .unwrap();
        ApiToken::new("second-token-0123456789".into())
            .unwrap()
            .write_private_file(&path)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "second-token-0123456789"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["api-token"], "no staging file is left");
    }

    #[test]
    fn short_tokens_are_refused() {
        assert!(matches!(
            ApiToken::new("short".into()),
            Err(TokenError::TooShort { len: 5 })
        ));
        assert!(ApiToken::new("x".repeat(16)).is_ok());
    }

    #[test]
    fn tokens_with_spaces_are_refused() {
        assert!(matches!(
            ApiToken::new("0123456789 abcdef".into()),
            Err(TokenError::BadCharacters)
        ));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let token = ApiToken::new(GOOD.into()).unwrap();
        let shown = format!("{token:?}");
        assert!(!shown.contains(GOOD));
        assert!(shown.contains("token:"));
    }

    #[test]
    fn file_with_private_mode_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "t", &format!("{GOOD}\n"), 0o600);
        let sources = TokenSources {
            file: Some(path),
            ..Default::default()
        };
        let token = load_token(&sources).unwrap().unwrap();
        assert_eq!(token.expose(), GOOD);
    }

    #[test]
    fn group_or_world_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o644, 0o620] {
            let path = write(dir.path(), "t", GOOD, mode);
            let sources = TokenSources {
                file: Some(path),
                ..Default::default()
            };
            let err = load_token(&sources).unwrap_err();
            assert!(
                matches!(err, TokenError::InsecurePermissions { .. }),
                "mode {mode:o}: {err}"
            );
        }
    }

    #[test]
    fn symlinked_file_is_judged_by_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = write(dir.path(), "real", GOOD, 0o644);
        let link = dir.path().join("link");
        symlink(&target, &link).unwrap();
        let sources = TokenSources {
            file: Some(link.clone()),
            ..Default::default()
        };
        assert!(matches!(
            load_token(&sources),
            Err(TokenError::InsecurePermissions { .. })
        ));
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_token(&sources).unwrap().is_some());
    }

    #[test]
    fn precedence_is_file_then_credentials_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "file", "file-token-000000000", 0o600);
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        write(&creds, "api-token", "cred-token-000000000", 0o400);
        let mut sources = TokenSources {
            file: Some(file),
            credentials_dir: Some(creds),
            env_token: Some("env-token-0000000000".into()),
        };
        assert_eq!(
            load_token(&sources).unwrap().unwrap().expose(),
            "file-token-000000000"
        );
        sources.file = None;
        assert_eq!(
            load_token(&sources).unwrap().unwrap().expose(),
            "cred-token-000000000"
        );
        sources.credentials_dir = Some(dir.path().join("absent"));
        assert_eq!(
            load_token(&sources).unwrap().unwrap().expose(),
            "env-token-0000000000"
        );
        sources.env_token = None;
        assert!(load_token(&sources).unwrap().is_none());
    }

    #[test]
    fn missing_file_is_an_error_naming_the_path() {
        let sources = TokenSources {
            file: Some(PathBuf::from("/nonexistent/rbee-token")),
            ..Default::default()
        };
        let err = load_token(&sources).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/rbee-token"), "{err}");
    }
}
