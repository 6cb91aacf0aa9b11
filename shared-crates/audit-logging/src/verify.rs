//! Checking a trail: every record's hash, every link, ids increasing, no
//! torn or unreadable line that the writer has not acknowledged.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::canonical::{canonical_json, chain_hash, GENESIS_HASH};
use crate::writer::file_name;

/// The trail's files in chain order (`audit-<first id>-<date>.jsonl`, sorted).
pub fn trail_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = file_name(p);
            name.starts_with("audit-") && name.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A trail that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Files read.
    pub files: usize,
    /// Records whose hash and link are right.
    pub records: u64,
    /// The last record's id.
    pub last_audit_id: Option<u64>,
    /// The last record's hash: compare it with a copy kept elsewhere to
    /// detect records removed from the end.
    pub last_hash: String,
    /// Acknowledged torn lines (crashes the writer recovered from).
    pub warnings: Vec<String>,
}

/// What is wrong at a place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The file could not be read.
    Unreadable(String),
    /// The line is not a JSON object (edited, or torn in the middle of a trail).
    NotJson(String),
    /// A required field is missing or of the wrong type.
    MissingField(&'static str),
    /// A float, which records never contain.
    ContainsFloat,
    /// The record's content does not match its hash: it was changed.
    HashMismatch,
    /// `prev_hash` is not the previous record's hash: a record before it
    /// was removed, inserted or moved.
    BrokenLink {
        /// The previous record's hash.
        expected: String,
        /// What this record says.
        found: String,
    },
    /// `audit_id` does not increase.
    IdNotIncreasing {
        /// Previous id.
        previous: u64,
        /// This id.
        found: u64,
    },
    /// The last line of a file has no newline: a write cut short by a crash,
    /// or a truncated file, and no recovery record acknowledges it.
    TornLine,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable(e) => write!(f, "unreadable: {e}"),
            Self::NotJson(e) => write!(f, "not a JSON record: {e}"),
            Self::MissingField(name) => write!(f, "missing or mistyped field `{name}`"),
            Self::ContainsFloat => f.write_str("contains a floating-point number"),
            Self::HashMismatch => f.write_str("content does not match its hash (record changed)"),
            Self::BrokenLink { expected, found } => write!(
                f,
                "prev_hash {found} does not match the previous record's hash {expected} (record removed, inserted or moved)"
            ),
            Self::IdNotIncreasing { previous, found } => {
                write!(f, "audit_id {found} does not follow {previous}")
            }
            Self::TornLine => f.write_str("incomplete last line (torn write or truncated file)"),
        }
    }
}

/// Where the trail first goes wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {problem}", file.display())]
pub struct VerifyFailure {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 for the whole file).
    pub line: u64,
    /// What is wrong.
    pub problem: Problem,
}

struct Chain {
    prev_hash: String,
    last_id: Option<u64>,
    records: u64,
}

/// Verify the trail in `dir` (one service's directory) from its first record.
pub fn verify_dir(dir: &Path) -> Result<VerifyReport, VerifyFailure> {
    let fail = |file: &Path, line, problem| VerifyFailure {
        file: file.to_owned(),
        line,
        problem,
    };
    let files = trail_files(dir).map_err(|e| fail(dir, 0, Problem::Unreadable(e.to_string())))?;
    let mut chain = Chain {
        prev_hash: GENESIS_HASH.to_owned(),
        last_id: None,
        records: 0,
    };
    let mut warnings = Vec::new();
    // A torn line waiting for the next file's recovery record: (file, line).
    let mut torn: Option<(PathBuf, u64)> = None;
    for path in &files {
        let content =
            std::fs::read(path).map_err(|e| fail(path, 0, Problem::Unreadable(e.to_string())))?;
        let complete_end = content
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let mut line_no = 0;
        for line in content[..complete_end].split_inclusive(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            line_no += 1;
            if let Some((torn_file, torn_line)) = torn.take() {
                if !acknowledges(line, &torn_file, torn_line) {
                    return Err(fail(&torn_file, torn_line, Problem::TornLine));
                }
                warnings.push(format!(
                    "{}:{torn_line}: torn line from an interrupted write, acknowledged by the recovery record at {}:{line_no}",
                    torn_file.display(),
                    path.display()
                ));
            }
            let record = check_record(line, &chain).map_err(|p| fail(path, line_no, p))?;
            chain.prev_hash = record.hash;
            chain.last_id = Some(record.id);
            chain.records += 1;
        }
        if complete_end < content.len() {
            if let Some((torn_file, torn_line)) = torn.take() {
                return Err(fail(&torn_file, torn_line, Problem::TornLine));
            }
            torn = Some((path.clone(), line_no + 1));
        }
    }
    if let Some((file, line)) = torn {
        return Err(fail(&file, line, Problem::TornLine));
    }
    Ok(VerifyReport {
        files: files.len(),
        records: chain.records,
        last_audit_id: chain.last_id,
        last_hash: chain.prev_hash,
        warnings,
    })
}

struct Checked {
    id: u64,
    hash: String,
}

fn check_record(line: &[u8], chain: &Chain) -> Result<Checked, Problem> {
    let mut value: Value =
        serde_json::from_slice(line).map_err(|e| Problem::NotJson(e.to_string()))?;
    let map = value
        .as_object_mut()
        .ok_or_else(|| Problem::NotJson("not an object".to_owned()))?;
    let hash = match map.remove("hash") {
        Some(Value::String(h)) => h,
        _ => return Err(Problem::MissingField("hash")),
    };
    let prev = map
        .get("prev_hash")
        .and_then(Value::as_str)
        .ok_or(Problem::MissingField("prev_hash"))?
        .to_owned();
    let id = map
        .get("audit_id")
        .and_then(Value::as_u64)
        .ok_or(Problem::MissingField("audit_id"))?;
    if !map.get("timestamp").is_some_and(Value::is_string) {
        return Err(Problem::MissingField("timestamp"));
    }
    if !map.get("service_id").is_some_and(Value::is_string) {
        return Err(Problem::MissingField("service_id"));
    }
    if !map.get("event").is_some_and(Value::is_object) {
        return Err(Problem::MissingField("event"));
    }
    let canonical = canonical_json(&value).map_err(|_| Problem::ContainsFloat)?;
    if chain_hash(&prev, &canonical) != hash {
        return Err(Problem::HashMismatch);
    }
    if prev != chain.prev_hash {
        return Err(Problem::BrokenLink {
            expected: chain.prev_hash.clone(),
            found: prev,
        });
    }
    if let Some(previous) = chain.last_id {
        if id <= previous {
            return Err(Problem::IdNotIncreasing {
                previous,
                found: id,
            });
        }
    }
    Ok(Checked { id, hash })
}

/// Whether `line` is a recovery record naming the torn line. Its hash and
/// link are checked as for any record right after.
fn acknowledges(line: &[u8], torn_file: &Path, torn_line: u64) -> bool {
    let Ok(record) = serde_json::from_slice::<Value>(line) else {
        return false;
    };
    let event = &record["event"];
    event["event_type"] == "trail_recovered"
        && event["file"].as_str() == Some(file_name(torn_file).as_str())
        && event["line"].as_u64() == Some(torn_line)
}

/// The last `n` complete records of the trail, oldest first.
pub fn tail(dir: &Path, n: usize) -> std::io::Result<Vec<Value>> {
    let mut out = std::collections::VecDeque::with_capacity(n.min(1024));
    for path in trail_files(dir)? {
        let content = std::fs::read(&path)?;
        for line in content.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(value) = serde_json::from_slice::<Value>(line) {
                if out.len() == n {
                    out.pop_front();
                }
                if n > 0 {
                    out.push_back(value);
                }
            }
        }
    }
    Ok(out.into())
}
