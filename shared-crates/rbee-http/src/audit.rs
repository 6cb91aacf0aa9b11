//! Connects the shared crates to the audit trail: authentication decisions
//! become `auth_success` / `auth_failure` records.

use audit_logging::{AuditEvent, AuditSink, AuthFailureReason};
use auth_min::{AuthDecision, AuthFailureKind, AuthObserver};

/// Records every decision of the auth layer on a protected route.
#[derive(Debug, Clone)]
pub struct AuditAuthObserver {
    sink: AuditSink,
}

impl AuditAuthObserver {
    /// Emit into `sink`.
    pub fn new(sink: AuditSink) -> Self {
        Self { sink }
    }
}

impl AuthObserver for AuditAuthObserver {
    fn observe(&self, decision: &AuthDecision<'_>) {
        self.sink.emit_with(decision.request_id, || {
            let method = decision.method.as_str().to_owned();
            let path = decision.path.to_owned();
            match (decision.failure, decision.fingerprint) {
                (None, Some(fp)) => AuditEvent::AuthSuccess {
                    token_fp: fp.clone(),
                    method,
                    path,
                    peer_ip: decision.peer_ip,
                },
                (failure, fingerprint) => AuditEvent::AuthFailure {
                    token_fp: fingerprint.cloned(),
                    method,
                    path,
                    peer_ip: decision.peer_ip,
                    reason: match failure {
                        Some(AuthFailureKind::Missing) => AuthFailureReason::Missing,
                        _ => AuthFailureReason::Invalid,
                    },
                },
            }
        });
    }
}
