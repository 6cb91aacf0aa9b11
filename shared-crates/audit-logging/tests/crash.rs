//! Crash safety with a real process: a child writes records with
//! `LLORCH_AUDIT_FLUSH=immediate` semantics and reports each one once it is
//! synced; the parent SIGKILLs it mid-stream, then checks that every
//! reported record is intact and that a restarted writer continues the chain.
//!
//! This test has its own `main` (harness = false) because the same binary
//! is the child process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use audit_logging::{verify_dir, AuditConfig, AuditEvent, AuditLogger, FlushPolicy};

const CHILD_ENV: &str = "RBEE_AUDIT_CRASH_CHILD_DIR";

fn config(root: &Path) -> AuditConfig {
    AuditConfig {
        flush: FlushPolicy::Immediate,
        min_free_bytes: 0,
        ..AuditConfig::local(root, "llm-worker-rbee-crash")
    }
}

fn event(i: u64) -> AuditEvent {
    AuditEvent::ModelEvicted {
        model_ref: format!("file:/models/m{i}.gguf"),
    }
}

/// The child: emit, wait until synced, report the index, forever.
fn child(root: &Path) -> ! {
    let logger = AuditLogger::open(&config(root)).expect("child opens the trail");
    let sink = logger.sink();
    for i in 0.. {
        sink.emit(None, event(i));
        if !sink.flush() {
            std::process::exit(3);
        }
        println!("{i}");
    }
    unreachable!("the loop never ends")
}

fn crash_then_resume() -> Result<(), String> {
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(CHILD_ENV, root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut reported = Vec::new();
    let started = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        reported.push(line.parse::<u64>().map_err(|e| e.to_string())?);
        if reported.len() == 200 || started.elapsed() > Duration::from_secs(30) {
            // Kill while it is writing the next records.
            child.kill().map_err(|e| e.to_string())?;
            break;
        }
    }
    child.wait().map_err(|e| e.to_string())?;
    if reported.len() < 50 {
        return Err(format!("child reported only {} records", reported.len()));
    }

    let dir = root.path().join("llm-worker-rbee-crash");
    let report = verify_dir(&dir).map_err(|f| format!("after the crash: {f}"))?;
    if report.records < reported.len() as u64 {
        return Err(format!(
            "{} records synced and reported, only {} on disk",
            reported.len(),
            report.records
        ));
    }
    let text = audit_logging::tail(&dir, usize::MAX).map_err(|e| e.to_string())?;
    for i in &reported {
        let want = format!("file:/models/m{i}.gguf");
        if !text
            .iter()
            .any(|r| r["event"]["model_ref"] == want.as_str())
        {
            return Err(format!("reported record {i} is missing"));
        }
    }

    // Restart and keep writing: the chain continues after the crash.
    let logger = AuditLogger::open(&config(root.path())).map_err(|e| e.to_string())?;
    let sink = logger.sink();
    for i in 10_000..10_010 {
        sink.emit(None, event(i));
    }
    logger.shutdown();
    let after = verify_dir(&dir).map_err(|f| format!("after the restart: {f}"))?;
    if after.records != report.records + 10 {
        return Err(format!(
            "expected {} records, found {}",
            report.records + 10,
            after.records
        ));
    }
    println!(
        "killed after {} synced records; {} on disk; chain continued to {}",
        reported.len(),
        report.records,
        after.records
    );
    Ok(())
}

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
    }
    let name = "a_killed_writer_loses_no_synced_record_and_the_chain_continues";
    match crash_then_resume() {
        Ok(()) => {
            println!("test {name} ... ok");
            println!("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        }
        Err(e) => {
            println!("test {name} ... FAILED: {e}");
            println!(
                "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            );
            std::process::exit(101);
        }
    }
}
