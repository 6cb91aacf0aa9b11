//! Reloading a daemon's settings on SIGHUP.
//!
//! A daemon registers one hook ([`crate::Daemon::on_reload`]). On SIGHUP
//! the hook reads the configuration again (flags, environment, settings
//! file, token file), checks all of it, and only then applies it; anything
//! wrong rejects the whole reload and the running settings stay. Either
//! way the outcome is logged, audited (`config_reloaded` with the changed
//! settings, or `config_invalid` with every problem) and counted in
//! `rbee_config_reloads_total{outcome="applied"|"rejected"}`.
//!
//! Settings a daemon cannot change while it runs (its address, its
//! database) are not applied: the reload names them as needing a restart.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use audit_logging::{AuditEvent, AuditSink, ConfigSetting};
use auth_min::{ApiToken, Authenticator, DEFAULT_ROTATION_GRACE};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::server::{CommonArgs, DaemonConfig};

/// What an applied reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// The settings now in effect that differ from before (secrets as
    /// fingerprints).
    pub changed: Vec<ConfigSetting>,
    /// Settings that differ in the configuration but only take effect at
    /// the next start.
    pub restart_required: Vec<String>,
}

/// The outcome of one reload: what changed, or every reason it was refused.
pub type ReloadResult = Result<Reloaded, Vec<String>>;

/// A daemon's reload, as [`crate::Daemon::on_reload`] keeps it.
pub(crate) type ReloadHook =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ReloadResult> + Send>> + Send + Sync>;

/// What a reload does to the API token.
#[derive(Debug)]
pub enum TokenChange {
    /// The token read again is the one in use.
    Same,
    /// A new token: accepted at once, the old one for the grace window.
    Rotate(ApiToken),
}

/// Why a reload's token is refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenChangeError {
    /// The token file or variable does not give a usable token.
    #[error(transparent)]
    Token(#[from] auth_min::TokenError),
    /// The reload would remove the token.
    #[error(
        "the API token cannot be removed by a reload; restart the daemon to serve without one"
    )]
    Removed,
    /// The reload would give a token to a daemon started without one.
    #[error("a daemon started without an API token cannot take one by a reload; restart it")]
    Added,
}

impl TokenChange {
    /// Read the token again from `common`'s sources and check it as at
    /// startup. A reload may rotate the token, but neither remove it from a
    /// daemon that has one nor give one to a daemon started without (both
    /// would fail every request of one side at once; restart instead). With
    /// a token on both sides the bind policy holds for any address.
    pub fn check(common: &CommonArgs, auth: &Authenticator) -> Result<Self, TokenChangeError> {
        let token = crate::server::configured_token(common)?;
        let current = auth.token();
        match (token, current) {
            (None, None) => Ok(Self::Same),
            (None, Some(_)) => Err(TokenChangeError::Removed),
            (Some(_), None) => Err(TokenChangeError::Added),
            (Some(new), Some(current)) => {
                if new.fingerprint() == current.fingerprint() {
                    Ok(Self::Same)
                } else {
                    Ok(Self::Rotate(new))
                }
            }
        }
    }

    /// The new token, if there is one.
    pub fn new_token(&self) -> Option<&ApiToken> {
        match self {
            Self::Same => None,
            Self::Rotate(token) => Some(token),
        }
    }

    /// Make the new token the current one (the old one stays accepted for
    /// [`DEFAULT_ROTATION_GRACE`]).
    pub fn apply(&self, auth: &Authenticator) {
        if let Self::Rotate(token) = self {
            auth.rotate(token, DEFAULT_ROTATION_GRACE);
        }
    }
}

/// The settings every daemon records: address, token fingerprint, log
/// format and drain bound. Of these only the token can change at runtime.
pub fn common_settings(
    addr: SocketAddr,
    common: &CommonArgs,
    token: Option<&ApiToken>,
) -> Vec<ConfigSetting> {
    vec![
        ConfigSetting::new("addr", addr),
        ConfigSetting::secret("api_token", token.map(ApiToken::fingerprint)),
        ConfigSetting::new(
            "log_format",
            format!("{:?}", common.log_format).to_lowercase(),
        ),
        ConfigSetting::new("shutdown_timeout_s", common.shutdown_timeout_s),
        ConfigSetting::new("header_read_timeout_s", common.header_read_timeout_s),
        ConfigSetting::new(
            "max_connections",
            common
                .max_connections
                .map_or_else(|| "auto".to_owned(), |n| n.to_string()),
        ),
        ConfigSetting::new("tls_cert", path_or_none(common.tls_cert.as_deref())),
        ConfigSetting::new("tls_key", path_or_none(common.tls_key.as_deref())),
        ConfigSetting::new("tls_ca", path_or_none(common.tls_ca.as_deref())),
    ]
}

fn path_or_none(path: Option<&std::path::Path>) -> String {
    path.map_or_else(|| "none".to_owned(), |p| p.display().to_string())
}

/// One daemon's reload: the configuration in effect, and how to render it.
///
/// [`reload`](Self::reload) reads the configuration again
/// ([`DaemonConfig::try_load`]), checks the token and the daemon's own
/// settings (`check`), and only when both pass rotates the token, runs
/// `apply` and keeps the new configuration.
pub struct Reloader<C> {
    current: Mutex<C>,
    auth: Authenticator,
    settings: fn(&C) -> Vec<ConfigSetting>,
    reloadable: &'static [&'static str],
}

impl<C> std::fmt::Debug for Reloader<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("reloadable", &self.reloadable)
            .finish_non_exhaustive()
    }
}

impl<C: DaemonConfig + Clone> Reloader<C> {
    /// `config` is in effect; `settings` renders a configuration's own
    /// settings (the shared ones are added); the settings named in
    /// `reloadable` can change at runtime (`api_token` always can).
    pub fn new(
        config: C,
        auth: Authenticator,
        settings: fn(&C) -> Vec<ConfigSetting>,
        reloadable: &'static [&'static str],
    ) -> Self {
        Self {
            current: Mutex::new(config),
            auth,
            settings,
            reloadable,
        }
    }

    fn render(&self, config: &C, token: Option<&ApiToken>) -> Vec<ConfigSetting> {
        let mut all = common_settings(config.addr(), config.common(), token);
        all.extend((self.settings)(config));
        all
    }

    /// Read, check, then apply; see the type's documentation.
    pub async fn reload<P, Fut>(
        &self,
        check: impl FnOnce(&C) -> Result<P, Vec<String>>,
        apply: impl FnOnce(P, &TokenChange) -> Fut,
    ) -> ReloadResult
    where
        Fut: Future<Output = ()>,
    {
        let new = C::try_load()?;
        let old = self.current.lock().clone();
        let token = TokenChange::check(new.common(), &self.auth);
        let plan = check(&new);
        let (token, plan) = match (token, plan) {
            (Ok(token), Ok(plan)) => (token, plan),
            (token, plan) => {
                let mut errors: Vec<String> =
                    token.err().map(|e| e.to_string()).into_iter().collect();
                errors.extend(plan.err().unwrap_or_default());
                return Err(errors);
            }
        };
        let before = self.render(&old, self.auth.token().as_ref());
        token.apply(&self.auth);
        apply(plan, &token).await;
        let mut reloadable = vec!["api_token"];
        reloadable.extend(self.reloadable);
        let out = diff(
            &before,
            &self.render(&new, self.auth.token().as_ref()),
            &reloadable,
        );
        *self.current.lock() = new;
        Ok(out)
    }
}

/// Compare two renderings of a daemon's settings: the differing ones named
/// in `reloadable` are changed, the other differing ones need a restart.
pub fn diff(old: &[ConfigSetting], new: &[ConfigSetting], reloadable: &[&str]) -> Reloaded {
    let mut out = Reloaded::default();
    for setting in new {
        let before = old.iter().find(|o| o.name == setting.name);
        if before.is_some_and(|b| b.value == setting.value) {
            continue;
        }
        if reloadable.contains(&setting.name.as_str()) {
            out.changed.push(setting.clone());
        } else {
            out.restart_required.push(setting.name.clone());
        }
    }
    out
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// `rbee_config_reloads_total`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReloadMetrics {
    reloads: Family<OutcomeLabel, Counter>,
}

impl ReloadMetrics {
    pub(crate) fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "rbee_config_reloads",
            "Configuration reloads (SIGHUP), by outcome: applied or rejected",
            metrics.reloads.clone(),
        );
        metrics
    }
}

/// What SIGHUP runs: a daemon's hook, and where its outcome is reported.
pub(crate) struct Reload {
    pub(crate) name: &'static str,
    /// The certificate and key, read again first.
    pub(crate) tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    pub(crate) hook: ReloadHook,
    pub(crate) audit: Option<AuditSink>,
    pub(crate) metrics: ReloadMetrics,
}

impl Reload {
    /// Run one reload and report it: log line, audit event, counter.
    pub(crate) async fn run(&self) {
        let Self {
            name,
            tls,
            hook,
            audit,
            metrics,
        } = self;
        let audit = audit.as_ref();
        tracing::info!("SIGHUP received; reloading the configuration");
        if let Some(tls) = tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate and key read again"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the TLS certificate and key again; serving the previous ones")
                }
            }
        }
        match hook().await {
            Ok(reloaded) => {
                let changed: Vec<&str> = reloaded.changed.iter().map(|s| s.name.as_str()).collect();
                if !reloaded.restart_required.is_empty() {
                    tracing::warn!(
                        settings = ?reloaded.restart_required,
                        "these settings changed but take effect only when {name} restarts"
                    );
                }
                tracing::info!(changed = ?changed, "configuration reloaded");
                metrics
                    .reloads
                    .get_or_create(&OutcomeLabel { outcome: "applied" })
                    .inc();
                if let Some(audit) = audit {
                    audit.emit(
                        None,
                        AuditEvent::ConfigReloaded {
                            changed: reloaded.changed,
                            restart_required: reloaded.restart_required,
                        },
                    );
                }
            }
            Err(errors) => {
                tracing::error!(
                    errors = ?errors,
                    "configuration rejected; the running settings stay as they were"
                );
                metrics
                    .reloads
                    .get_or_create(&OutcomeLabel {
                        outcome: "rejected",
                    })
                    .inc();
                if let Some(audit) = audit {
                    audit.emit(None, AuditEvent::ConfigInvalid { errors });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, value: &str) -> ConfigSetting {
        ConfigSetting::new(name, value)
    }

    #[test]
    fn diff_splits_changes_into_applied_and_restart_required() {
        let old = [s("addr", "a"), s("max_queue", "256"), s("hives", "")];
        let new = [s("addr", "b"), s("max_queue", "8"), s("hives", "")];
        let out = diff(&old, &new, &["max_queue", "hives"]);
        assert_eq!(out.changed, vec![s("max_queue", "8")]);
        assert_eq!(out.restart_required, vec!["addr".to_owned()]);
        assert_eq!(diff(&old, &old, &[]), Reloaded::default());
    }

    fn common(file: Option<std::path::PathBuf>) -> CommonArgs {
        CommonArgs {
            api_token_file: file,
            log_format: crate::LogFormat::Text,
            shutdown_timeout_s: 30,
            header_read_timeout_s: 10,
            max_connections: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            routes: false,
        }
    }

    #[test]
    fn a_reload_rotates_the_token_but_never_adds_or_removes_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        let write = |text: &str| {
            std::fs::write(&path, text).expect("write token");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        };
        let old = ApiToken::new("old-token-0123456789".into()).expect("token");
        let auth = Authenticator::new(&old);

        write("old-token-0123456789\n");
        let change = TokenChange::check(&common(Some(path.clone())), &auth).expect("same");
        assert!(change.new_token().is_none());

        write("new-token-0123456789");
        let change = TokenChange::check(&common(Some(path.clone())), &auth).expect("new");
        assert_eq!(
            change.new_token().map(|t| t.fingerprint().clone()),
            Some(auth_min::Fingerprint::of("new-token-0123456789"))
        );
        change.apply(&auth);
        assert_eq!(
            auth.token().map(|t| t.fingerprint().clone()),
            Some(auth_min::Fingerprint::of("new-token-0123456789"))
        );
        assert!(
            auth.previous_bearer().is_some(),
            "old token in its grace window"
        );

        write("short");
        let refused = TokenChange::check(&common(Some(path.clone())), &auth);
        assert!(refused.is_err(), "a too-short token is refused");

        let removed = TokenChange::check(&common(None), &auth);
        assert!(
            removed.is_err_and(|e| e.to_string().contains("cannot be removed")),
            "removing the token is refused"
        );
        write("new-token-0123456789");
        let added = TokenChange::check(&common(Some(path.clone())), &Authenticator::open());
        assert!(added.is_err_and(|e| e.to_string().contains("started without")));
    }
}
