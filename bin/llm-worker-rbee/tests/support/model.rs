//! The default model for the worker's in-process tests, fetched once by the
//! project's script.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The default model's path (`scripts/fetch-model.sh` prints it).
pub fn default_model() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-model.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run fetch-model.sh");
    assert!(out.status.success(), "fetching the default model failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
