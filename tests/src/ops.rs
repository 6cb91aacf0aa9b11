//! The deployment files (`deploy/`) and the tools that check them:
//! Debian's systemd and prometheus, `kubernetes-validate` from PyPI, the
//! Prometheus Operator's CRD schemas from npm, made present by
//! `scripts/ops-tools.sh`.

use std::path::PathBuf;
use std::process::Command;

use crate::workspace_root;

/// What `scripts/ops-tools.sh` installed (it runs once per test binary).
#[derive(Debug)]
pub struct OpsTools {
    /// A python with `kubernetes-validate`.
    pub python: PathBuf,
    /// npm modules for `scripts/validate-crds.mjs`.
    pub node_modules: PathBuf,
}

/// Install what is missing (once per test binary) and say where it is.
pub fn ops_tools() -> &'static OpsTools {
    static TOOLS: std::sync::OnceLock<OpsTools> = std::sync::OnceLock::new();
    TOOLS.get_or_init(|| {
        let out = Command::new("bash")
            .arg(workspace_root().join("scripts/ops-tools.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run scripts/ops-tools.sh");
        assert!(out.status.success(), "installing the ops tools failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("ops-tools.sh printed no {key}: {text}"))
        };
        OpsTools {
            python: field("python="),
            node_modules: field("node_modules="),
        }
    })
}

/// `deploy/<path>` in the workspace.
pub fn deploy(path: &str) -> PathBuf {
    workspace_root().join("deploy").join(path)
}

/// Run a checking tool to its end (after [`ops_tools`] made it present):
/// whether it succeeded, and its stdout and stderr together.
pub fn run_tool(command: &mut Command) -> (bool, String) {
    ops_tools();
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", command.get_program()));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
