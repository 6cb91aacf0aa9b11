//! `rbee-audit`: verify an audit trail, or show its last records.
//!
//! `rbee-audit verify DIR` exits 0 and prints the record count when every
//! hash and link is right, or prints the first broken `file:line` and exits 1.
//! DIR is one service's directory (`$LLORCH_AUDIT_DIR/rbee-hive`) or the audit
//! root, in which case every service directory below it is verified.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Verify or read rbee audit trails.
#[derive(Debug, Parser)]
#[command(name = "rbee-audit", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check every record's hash and link; exit 1 at the first problem.
    Verify {
        /// A service's audit directory, or the audit root.
        dir: PathBuf,
    },
    /// Pretty-print the last records.
    Tail {
        /// A service's audit directory.
        dir: PathBuf,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Verify { dir } => verify(&dir),
        Command::Tail { dir, lines } => match audit_logging::tail(&dir, lines) {
            Ok(records) => {
                for record in records {
                    match serde_json::to_string_pretty(&record) {
                        Ok(text) => println!("{text}"),
                        Err(e) => eprintln!("rbee-audit: {e}"),
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rbee-audit: cannot read {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
    }
}

fn verify(dir: &Path) -> ExitCode {
    let dirs = match service_dirs(dir) {
        Ok(d) if !d.is_empty() => d,
        Ok(_) => {
            eprintln!("rbee-audit: no audit files in {}", dir.display());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("rbee-audit: cannot read {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    for service in dirs {
        match audit_logging::verify_dir(&service) {
            Ok(report) => {
                for warning in &report.warnings {
                    println!("warning: {warning}");
                }
                println!(
                    "OK {}: {} records in {} files; last audit_id {}, last hash {}",
                    service.display(),
                    report.records,
                    report.files,
                    report
                        .last_audit_id
                        .map_or_else(|| "-".to_owned(), |id| id.to_string()),
                    report.last_hash
                );
            }
            Err(failure) => {
                println!("FAILED {failure}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `dir` itself when it holds audit files, else its subdirectories that do.
fn service_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !audit_logging::trail_files(dir)?.is_empty() {
        return Ok(vec![dir.to_owned()]);
    }
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && !audit_logging::trail_files(&path)?.is_empty() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}
