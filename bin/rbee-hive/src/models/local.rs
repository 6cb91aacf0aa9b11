//! `file:` references: check that a path names a model the worker can load,
//! and hash files without blocking the async runtime.
//!
//! A GGUF file must start with the `GGUF` magic. A safetensors directory
//! must hold `config.json`, `tokenizer.json` and at least one
//! `*.safetensors` file with a valid header, and every file taken from it
//! must resolve (symlinks followed) inside the directory that was named.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rbee_api::{ApiError, ErrorCode, FieldError};
use sha2::{Digest, Sha256};

use super::hub::Format;

/// Largest safetensors JSON header accepted (the format's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

/// A validated local model.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// The named path, symlinks resolved.
    pub path: PathBuf,
    /// GGUF or safetensors.
    pub format: Format,
    /// The files a worker reads, with sizes.
    pub files: Vec<(PathBuf, u64)>,
}

/// Check `named` (from `file:NAMED`). Blocking: call it on a blocking thread.
pub fn inspect(named: &Path, display: &str) -> Result<LocalModel, ApiError> {
    let meta = std::fs::metadata(named).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ApiError::new(
            ErrorCode::ModelNotFound,
            format!("{display}: no such file or directory"),
        ),
        _ => invalid(display, format!("cannot be read: {e}")),
    })?;
    let path = named
        .canonicalize()
        .map_err(|e| invalid(display, format!("cannot be resolved: {e}")))?;
    if meta.is_file() {
        let mut magic = [0u8; 4];
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| invalid(display, format!("cannot be read as a GGUF file: {e}")))?;
        if &magic != b"GGUF" {
            return Err(invalid(
                display,
                "is neither a GGUF file (no GGUF magic) nor a safetensors directory".to_owned(),
            ));
        }
        return Ok(LocalModel {
            files: vec![(path.clone(), meta.len())],
            path,
            format: Format::Gguf,
        });
    }
    if !meta.is_dir() {
        return Err(invalid(
            display,
            "is not a regular file or a directory".to_owned(),
        ));
    }
    let entries = std::fs::read_dir(&path)
        .map_err(|e| invalid(display, format!("cannot list the directory: {e}")))?;
    let mut files = Vec::new();
    let mut weights = 0usize;
    for entry in entries {
        let entry =
            entry.map_err(|e| invalid(display, format!("cannot list the directory: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors");
        let wanted = is_weights
            || matches!(
                name.as_str(),
                "config.json"
                    | "tokenizer.json"
                    | "tokenizer_config.json"
                    | "generation_config.json"
                    | "special_tokens_map.json"
                    | "model.safetensors.index.json"
            );
        if !wanted {
            continue;
        }
        let resolved = entry
            .path()
            .canonicalize()
            .map_err(|e| invalid(display, format!("{name} cannot be resolved: {e}")))?;
        if resolved.parent() != Some(path.as_path()) {
            return Err(invalid(
                display,
                format!(
                    "{name} resolves to {}, outside the named directory",
                    resolved.display()
                ),
            ));
        }
        let size = std::fs::metadata(&resolved)
            .map_err(|e| invalid(display, format!("{name} cannot be read: {e}")))?
            .len();
        if is_weights {
            check_safetensors_header(&resolved, size).map_err(|why| {
                invalid(display, format!("{name} is not a safetensors file: {why}"))
            })?;
            weights += 1;
        }
        files.push((resolved, size));
    }
    files.sort();
    let has = |n: &str| {
        files
            .iter()
            .any(|(p, _)| p.file_name().is_some_and(|f| f == n))
    };
    if weights == 0 || !has("config.json") || !has("tokenizer.json") {
        return Err(invalid(
            display,
            "is a directory without a safetensors model (config.json, tokenizer.json and *.safetensors)"
                .to_owned(),
        ));
    }
    Ok(LocalModel {
        path,
        format: Format::Safetensors,
        files,
    })
}

fn invalid(display: &str, what: String) -> ApiError {
    ApiError::invalid_fields(
        ErrorCode::InvalidRequest,
        vec![FieldError::new(
            "model_ref",
            "model",
            format!("{display} {what}"),
        )],
    )
}

fn check_safetensors_header(path: &Path, size: u64) -> Result<(), String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len == 0 || len > MAX_SAFETENSORS_HEADER || len + 8 > size {
        return Err(format!(
            "header length {len} does not fit a file of {size} bytes"
        ));
    }
    let mut first = [0u8; 1];
    f.read_exact(&mut first).map_err(|e| e.to_string())?;
    if first[0] != b'{' {
        return Err("the header is not JSON".to_owned());
    }
    Ok(())
}

/// SHA-256 of a file as lowercase hex, adding each block's length to
/// `progress`. Returns `None` when `stop` returns true between blocks.
/// Blocking: call it on a blocking thread.
pub fn hash_file(
    path: &Path,
    progress: &AtomicU64,
    stop: &dyn Fn() -> bool,
) -> std::io::Result<Option<String>> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if stop() {
            return Ok(None);
        }
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(Some(hex::encode(hasher.finalize())))
}

/// The digest recorded for a directory model: SHA-256 over one
/// `<name> <sha256>\n` line per file, in name order.
pub fn manifest_digest(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for (name, sha) in sorted {
        hasher.update(format!("{name} {sha}\n").as_bytes());
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors_bytes() -> Vec<u8> {
        let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header);
        out.extend_from_slice(&[0, 0, 0, 0]);
        out
    }

    #[test]
    fn a_gguf_file_is_accepted_and_anything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"GGUF\x03\0\0\0rest").unwrap();
        let m = inspect(&gguf, "file:m").unwrap();
        assert_eq!(m.format, Format::Gguf);
        assert_eq!(m.files[0].1, 12);

        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"hello world").unwrap();
        let err = inspect(&text, "file:notes").unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        assert!(err.body().error.message.contains("GGUF"));

        let err = inspect(&dir.path().join("absent.gguf"), "file:absent").unwrap_err();
        assert_eq!(err.code(), ErrorCode::ModelNotFound);
    }

    #[test]
    fn a_safetensors_directory_needs_config_tokenizer_and_valid_weights() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), b"{}").unwrap();
        let err = inspect(&model, "file:model").unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);

        std::fs::write(model.join("tokenizer.json"), b"{}").unwrap();
        std::fs::write(model.join("model.safetensors"), b"garbage!garbage").unwrap();
        let err = inspect(&model, "file:model").unwrap_err();
        assert!(err.body().error.message.contains("not a safetensors file"));

        std::fs::write(model.join("model.safetensors"), safetensors_bytes()).unwrap();
        std::fs::write(model.join("README.md"), b"ignored").unwrap();
        let ok = inspect(&model, "file:model").unwrap();
        assert_eq!(ok.format, Format::Safetensors);
        assert_eq!(ok.files.len(), 3);
    }

    #[test]
    fn a_file_linked_from_outside_the_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), b"{}").unwrap();
        std::fs::write(model.join("model.safetensors"), safetensors_bytes()).unwrap();
        let outside = dir.path().join("secret.json");
        std::fs::write(&outside, b"{}").unwrap();
        std::os::unix::fs::symlink(&outside, model.join("tokenizer.json")).unwrap();
        let err = inspect(&model, "file:model").unwrap_err();
        assert!(
            err.body()
                .error
                .message
                .contains("outside the named directory"),
            "{}",
            err.body().error.message
        );
    }

    #[test]
    fn hashing_reports_progress_and_can_stop() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        let progress = AtomicU64::new(0);
        let sha = hash_file(&f, &progress, &|| false).unwrap().unwrap();
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(progress.load(Ordering::Relaxed), 3);
        assert_eq!(hash_file(&f, &progress, &|| true).unwrap(), None);
        let a = manifest_digest(&[("b".into(), "2".into()), ("a".into(), "1".into())]);
        let b = manifest_digest(&[("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert_eq!(a, b);
    }
}
