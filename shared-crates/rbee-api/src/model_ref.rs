//! Model references: `hf:ORG/REPO[@REVISION][:FILE]` and `file:/abs/path`.
//!
//! A reference names a model the way a user types it. Parsing is strict so
//! that a reference can travel in URLs, process arguments, log lines and
//! file names without quoting: repository ids, revisions and file names use
//! a small character set, never `..`, and a local path is absolute, has no
//! `.`/`..` components and no shell metacharacters.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::FieldError;

/// The longest reference accepted, in bytes.
pub const MAX_MODEL_REF_LEN: usize = 4096;

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelRef {
    /// A model on Hugging Face (or a server with its layout, `HF_ENDPOINT`).
    HuggingFace(HfRef),
    /// A GGUF file or a safetensors directory on the host.
    File(PathBuf),
}

/// The Hugging Face part of [`ModelRef::HuggingFace`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HfRef {
    /// `ORG/REPO`.
    pub repo: String,
    /// A branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
    /// One file of the repository (a GGUF quantization), when named.
    pub file: Option<String>,
}

impl HfRef {
    /// The revision to ask the Hub for.
    pub fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// Why a string is not a model reference; the message is for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModelRefError(String);

impl ModelRefError {
    /// As a validation error of the request field `field`.
    pub fn into_field_error(self, field: &str) -> FieldError {
        FieldError::new(field, "format", self.0)
    }
}

impl ModelRef {
    /// Parse `input`, which must be `hf:...` or `file:...`.
    pub fn parse(input: &str) -> Result<Self, ModelRefError> {
        if input.len() > MAX_MODEL_REF_LEN {
            return Err(ModelRefError(format!(
                "model_ref is longer than {MAX_MODEL_REF_LEN} bytes"
            )));
        }
        if let Some(rest) = input.strip_prefix("hf:") {
            parse_hf(rest).map(Self::HuggingFace)
        } else if let Some(rest) = input.strip_prefix("file:") {
            parse_file(rest).map(Self::File)
        } else {
            Err(ModelRefError(format!(
                "model_ref {input:?} must start with hf: (hf:ORG/REPO[@REVISION][:FILE]) or file: (file:/absolute/path)"
            )))
        }
    }

    /// `hf` or `file`, the catalog's `provider` column.
    pub fn provider(&self) -> &'static str {
        match self {
            Self::HuggingFace(_) => "hf",
            Self::File(_) => "file",
        }
    }
}

impl std::str::FromStr for ModelRef {
    type Err = ModelRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HuggingFace(hf) => {
                write!(f, "hf:{}", hf.repo)?;
                if let Some(rev) = &hf.revision {
                    write!(f, "@{rev}")?;
                }
                if let Some(file) = &hf.file {
                    write!(f, ":{file}")?;
                }
                Ok(())
            }
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

fn parse_hf(rest: &str) -> Result<HfRef, ModelRefError> {
    let (repo_rev, file) = match rest.split_once(':') {
        Some((head, file)) => (head, Some(file)),
        None => (rest, None),
    };
    let (repo, revision) = match repo_rev.split_once('@') {
        Some((repo, rev)) => (repo, Some(rev)),
        None => (repo_rev, None),
    };
    let mut segments = repo.split('/');
    let (Some(org), Some(name), None) = (segments.next(), segments.next(), segments.next()) else {
        return Err(ModelRefError(format!(
            "hf:{repo} is not a repository id of the form ORG/REPO"
        )));
    };
    for (what, segment) in [("organisation", org), ("repository name", name)] {
        check_name(what, segment, 96)?;
    }
    if let Some(rev) = revision {
        check_path_like("revision", rev)?;
    }
    if let Some(file) = file {
        check_path_like("file", file)?;
    }
    Ok(HfRef {
        repo: repo.to_owned(),
        revision: revision.map(str::to_owned),
        file: file.map(str::to_owned),
    })
}

fn check_name(what: &str, s: &str, max: usize) -> Result<(), ModelRefError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !s.contains("..");
    if ok {
        Ok(())
    } else {
        Err(ModelRefError(format!(
            "{what} {s:?} must be 1 to {max} of A-Z a-z 0-9 . _ -, start with a letter or digit and not contain .."
        )))
    }
}

/// A revision or a file inside a repository: `/`-separated names.
/// Check a file name inside a repository as a user-given `:FILE` is
/// checked: `/`-separated names of `A-Z a-z 0-9 . _ - +`, no empty, `.` or
/// `..` part, none starting with `-`, at most 255 bytes. A name a Hub listing
/// returns is checked the same way before it names a path on disk.
pub fn check_repo_file_name(name: &str) -> Result<(), ModelRefError> {
    check_path_like("file", name)
}

fn check_path_like(what: &str, s: &str) -> Result<(), ModelRefError> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && !segment.starts_with('-')
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
        });
    if ok {
        Ok(())
    } else {
        Err(ModelRefError(format!(
            "{what} {s:?} must be /-separated names of A-Z a-z 0-9 . _ - +, without empty, . or .. parts"
        )))
    }
}

/// Characters a shell would interpret; refused in paths so that a
/// reference is safe in any log line or argument list.
const SHELL_METACHARACTERS: &[char] = &[
    ';', '|', '&', '$', '`', '<', '>', '(', ')', '{', '}', '*', '?', '!', '\\', '"', '\'', '~',
    '#', '[', ']',
];

fn parse_file(rest: &str) -> Result<PathBuf, ModelRefError> {
    let path = Path::new(rest);
    if !path.is_absolute() {
        return Err(ModelRefError(format!(
            "file:{rest} must be an absolute path"
        )));
    }
    if rest.chars().any(|c| c.is_control()) {
        return Err(ModelRefError(
            "file: path must not contain control characters".to_owned(),
        ));
    }
    if let Some(c) = rest.chars().find(|c| SHELL_METACHARACTERS.contains(c)) {
        return Err(ModelRefError(format!(
            "file:{rest} must not contain the shell metacharacter {c:?}"
        )));
    }
    // `Path::components` hides `.` and doubled slashes, so check the text.
    if rest
        .split('/')
        .skip(1)
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(ModelRefError(format!(
            "file:{rest} must not contain empty, . or .. components"
        )));
    }
    debug_assert!(path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hf(repo: &str, revision: Option<&str>, file: Option<&str>) -> ModelRef {
        ModelRef::HuggingFace(HfRef {
            repo: repo.to_owned(),
            revision: revision.map(str::to_owned),
            file: file.map(str::to_owned),
        })
    }

    #[test]
    fn hf_refs_parse_with_revision_and_file() {
        assert_eq!(
            ModelRef::parse("hf:TheOrg/Model-1.5B").unwrap(),
            hf("TheOrg/Model-1.5B", None, None)
        );
        assert_eq!(
            ModelRef::parse("hf:o/r@v1.0:model.Q4_K_M.gguf").unwrap(),
            hf("o/r", Some("v1.0"), Some("model.Q4_K_M.gguf"))
        );
        assert_eq!(
            ModelRef::parse("hf:o/r@refs/pr/3").unwrap(),
            hf("o/r", Some("refs/pr/3"), None)
        );
        assert_eq!(
            ModelRef::parse("hf:o/r:sub/dir/w.gguf").unwrap(),
            hf("o/r", None, Some("sub/dir/w.gguf"))
        );
    }

    #[test]
    fn file_refs_must_be_absolute_and_plain() {
        assert_eq!(
            ModelRef::parse("file:/models/a b.gguf").unwrap(),
            ModelRef::File(PathBuf::from("/models/a b.gguf"))
        );
        for bad in [
            "file:models/a.gguf",
            "file:/models/../etc/passwd",
            "file:/models/./a.gguf",
            "file:/models//a.gguf",
            "file:/models/a.gguf;rm",
            "file:/models/$(id)",
            "file:/models/a\n.gguf",
            "file:",
        ] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn malformed_hf_refs_are_refused() {
        for bad in [
            "hf:",
            "hf:noslash",
            "hf:a/b/c",
            "hf:../x",
            "hf:o/..",
            "hf:o/r@",
            "hf:o/r:",
            "hf:o/r:../../etc/passwd",
            "hf:o/r@a/../b",
            "hf:o/r:-rf",
            "hf:o/r x",
            "hf:o/r:a;b",
            "s3://bucket/model",
            "gpt2",
        ] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = ModelRef::parse("gpt2")
            .unwrap_err()
            .into_field_error("model_ref");
        assert_eq!(e.field, "model_ref");
        assert!(e.message.contains("hf:"));
    }

    proptest! {
        #[test]
        fn display_round_trips(
            org in "[a-zA-Z0-9][a-zA-Z0-9_-]{0,10}",
            name in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,20}",
            rev in proptest::option::of("[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}"),
            file in proptest::option::of("[a-zA-Z0-9_]{1,12}\\.gguf"),
        ) {
            prop_assume!(!name.contains(".."));
            let text = hf(&format!("{org}/{name}"), rev.as_deref(), file.as_deref()).to_string();
            let parsed = ModelRef::parse(&text).unwrap();
            prop_assert_eq!(parsed.to_string(), text);
        }

        #[test]
        fn whatever_parses_round_trips(input in "(hf:|file:/)?\\PC{0,40}") {
            if let Ok(parsed) = ModelRef::parse(&input) {
                prop_assert_eq!(ModelRef::parse(&parsed.to_string()), Ok(parsed));
            }
        }
    }
}
