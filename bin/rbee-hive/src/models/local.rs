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

use rbee_api::{Coded, ErrorCode, FieldError};
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

/// Why a `file:` reference names no model a worker can load. Every
/// variant but `Missing` is the request's fault (`details.fields` names
/// `model_ref`).
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Nothing at the path.
    #[error("{display}: no such file or directory")]
    Missing { display: String },
    /// The path exists but cannot be read.
    #[error("{display} cannot be read")]
    Unreadable {
        display: String,
        #[source]
        source: std::io::Error,
    },
    /// Its symlinks cannot be followed.
    #[error("{display} cannot be resolved")]
    Unresolved {
        display: String,
        #[source]
        source: std::io::Error,
    },
    /// A file whose first four bytes cannot be read.
    #[error("{display} cannot be read as a GGUF file")]
    ShortFile {
        display: String,
        #[source]
        source: std::io::Error,
    },
    /// A file without the GGUF magic.
    #[error("{display} is neither a GGUF file (no GGUF magic) nor a safetensors directory")]
    NotGguf { display: String },
    /// Neither a file nor a directory.
    #[error("{display} is not a regular file or a directory")]
    NotFileOrDir { display: String },
    /// The directory cannot be listed.
    #[error("{display} cannot list the directory")]
    Unlisted {
        display: String,
        #[source]
        source: std::io::Error,
    },
    /// A file of the directory cannot be resolved.
    #[error("{display} {name} cannot be resolved")]
    EntryUnresolved {
        display: String,
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// A file of the directory resolves outside it.
    #[error("{display} {name} resolves to {}, outside the named directory", target.display())]
    Escapes {
        display: String,
        name: String,
        target: PathBuf,
    },
    /// A file of the directory cannot be read.
    #[error("{display} {name} cannot be read")]
    EntryUnreadable {
        display: String,
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// A `*.safetensors` file with a bad header.
    #[error("{display} {name} is not a safetensors file")]
    NotSafetensors {
        display: String,
        name: String,
        #[source]
        source: HeaderError,
    },
    /// A directory without config, tokenizer and weights.
    #[error("{display} is a directory without a safetensors model (config.json, tokenizer.json and *.safetensors)")]
    NoModel { display: String },
}

impl Coded for LocalError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Missing { .. } => ErrorCode::ModelNotFound,
            _ => ErrorCode::InvalidRequest,
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            Self::Missing { .. } => None,
            _ => Some(rbee_api::error::fields_details(&[FieldError::new(
                "model_ref",
                "model",
                rbee_api::error::chain(self),
            )])),
        }
    }
}

/// Why a safetensors header is refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The file cannot be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The declared length is zero, too large, or past the end.
    #[error("header length {len} does not fit a file of {size} bytes")]
    Length { len: u64, size: u64 },
    /// The header does not start with `{`.
    #[error("the header is not JSON")]
    NotJson,
}

/// Check `named` (from `file:NAMED`). Blocking: call it on a blocking thread.
pub fn inspect(named: &Path, display: &str) -> Result<LocalModel, LocalError> {
    let d = || display.to_owned();
    let meta = std::fs::metadata(named).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => LocalError::Missing { display: d() },
        _ => LocalError::Unreadable {
            display: d(),
            source,
        },
    })?;
    let path = named
        .canonicalize()
        .map_err(|source| LocalError::Unresolved {
            display: d(),
            source,
        })?;
    if meta.is_file() {
        let mut magic = [0u8; 4];
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|source| LocalError::ShortFile {
                display: d(),
                source,
            })?;
        if &magic != b"GGUF" {
            return Err(LocalError::NotGguf { display: d() });
        }
        return Ok(LocalModel {
            files: vec![(path.clone(), meta.len())],
            path,
            format: Format::Gguf,
        });
    }
    if !meta.is_dir() {
        return Err(LocalError::NotFileOrDir { display: d() });
    }
    let unlisted = |source| LocalError::Unlisted {
        display: d(),
        source,
    };
    let entries = std::fs::read_dir(&path).map_err(unlisted)?;
    let mut files = Vec::new();
    let mut weights = 0usize;
    for entry in entries {
        let entry = entry.map_err(unlisted)?;
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
                    | "modules.json"
                    | "sentence_bert_config.json"
            );
        if !wanted {
            continue;
        }
        let resolved = match entry.path().canonicalize() {
            Ok(resolved) => resolved,
            Err(source) => {
                return Err(LocalError::EntryUnresolved {
                    display: d(),
                    name,
                    source,
                })
            }
        };
        if resolved.parent() != Some(path.as_path()) {
            return Err(LocalError::Escapes {
                display: d(),
                name,
                target: resolved,
            });
        }
        let size = match std::fs::metadata(&resolved) {
            Ok(meta) => meta.len(),
            Err(source) => {
                return Err(LocalError::EntryUnreadable {
                    display: d(),
                    name,
                    source,
                })
            }
        };
        if is_weights {
            if let Err(source) = check_safetensors_header(&resolved, size) {
                return Err(LocalError::NotSafetensors {
                    display: d(),
                    name,
                    source,
                });
            }
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
        return Err(LocalError::NoModel { display: d() });
    }
    Ok(LocalModel {
        path,
        format: Format::Safetensors,
        files,
    })
}

fn check_safetensors_header(path: &Path, size: u64) -> Result<(), HeaderError> {
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len == 0 || len > MAX_SAFETENSORS_HEADER || len + 8 > size {
        return Err(HeaderError::Length { len, size });
    }
    let mut first = [0u8; 1];
    f.read_exact(&mut first)?;
    if first[0] != b'{' {
        return Err(HeaderError::NotJson);
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
    use rbee_api::ApiError;

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
        let err: ApiError = inspect(&text, "file:notes").unwrap_err().into();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        assert!(err.body().error.message.contains("GGUF"));

        let err: ApiError = inspect(&dir.path().join("absent.gguf"), "file:absent")
            .unwrap_err()
            .into();
        assert_eq!(err.code(), ErrorCode::ModelNotFound);
    }

    #[test]
    fn a_safetensors_directory_needs_config_tokenizer_and_valid_weights() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), b"{}").unwrap();
        let err: ApiError = inspect(&model, "file:model").unwrap_err().into();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);

        std::fs::write(model.join("tokenizer.json"), b"{}").unwrap();
        std::fs::write(model.join("model.safetensors"), b"garbage!garbage").unwrap();
        let err: ApiError = inspect(&model, "file:model").unwrap_err().into();
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
        let err: ApiError = inspect(&model, "file:model").unwrap_err().into();
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
