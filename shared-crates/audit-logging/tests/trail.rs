//! The trail on real files: chaining, tamper detection, restarts, rotation,
//! locking, disabled mode, the disk reserve and torn lines.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use audit_logging::{
    trail_files, verify_dir, AuditConfig, AuditEvent, AuditLogger, FlushPolicy, Problem,
};

fn event(i: u64) -> AuditEvent {
    AuditEvent::HiveRegistered {
        node_name: format!("node-{i}"),
        url: format!("http://10.0.0.{}:9200", i % 250),
    }
}

fn config(root: &Path) -> AuditConfig {
    AuditConfig {
        min_free_bytes: 0,
        ..AuditConfig::local(root, "rbee-hive")
    }
}

fn write(config: &AuditConfig, range: std::ops::Range<u64>) {
    let logger = AuditLogger::open(config).expect("open the audit trail");
    let sink = logger.sink();
    for i in range {
        sink.emit(Some(&format!("req-{i}")), event(i));
        // Keep well inside the buffer so no event is dropped.
        if i % 1000 == 999 {
            assert!(sink.flush());
        }
    }
    logger.shutdown();
    assert_eq!(sink.dropped(), 0);
}

fn service_dir(root: &Path) -> PathBuf {
    root.join("rbee-hive")
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read the audit file")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn rewrite(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .expect("rewrite the audit file");
}

#[test]
fn a_chain_of_1000_records_verifies() {
    let root = tempfile::tempdir().unwrap();
    write(&config(root.path()), 0..1000);
    let report = verify_dir(&service_dir(root.path())).unwrap();
    assert_eq!(report.records, 1000);
    assert_eq!(report.last_audit_id, Some(1000));
    assert!(report.warnings.is_empty());
    let first: serde_json::Value =
        serde_json::from_str(&lines_of(&trail_files(&service_dir(root.path())).unwrap()[0])[0])
            .unwrap();
    assert_eq!(first["prev_hash"], audit_logging::GENESIS_HASH);
    assert_eq!(first["service_id"], "rbee-hive");
    assert_eq!(first["request_id"], "req-0");
    assert_eq!(first["event"]["event_type"], "hive_registered");
}

fn tampered(edit: impl FnOnce(&mut Vec<String>)) -> audit_logging::VerifyFailure {
    let root = tempfile::tempdir().expect("create a temp dir");
    write(&config(root.path()), 0..1000);
    let file = trail_files(&service_dir(root.path()))
        .expect("list the trail files")
        .remove(0);
    let mut lines = lines_of(&file);
    edit(&mut lines);
    rewrite(&file, &lines);
    verify_dir(&service_dir(root.path())).expect_err("verification must fail")
}

#[test]
fn changing_one_byte_of_a_middle_record_is_located() {
    let failure = tampered(|lines| {
        lines[499] = lines[499].replace("node-499", "node-49X");
    });
    assert_eq!(failure.line, 500);
    assert_eq!(failure.problem, Problem::HashMismatch);
}

#[test]
fn changing_a_byte_that_breaks_the_json_is_located() {
    let failure = tampered(|lines| {
        lines[10] = lines[10].replacen('{', "[", 1);
    });
    assert_eq!(failure.line, 11);
    assert!(matches!(failure.problem, Problem::NotJson(_)), "{failure}");
}

#[test]
fn deleting_a_record_is_located_at_the_next_one() {
    let failure = tampered(|lines| {
        lines.remove(300);
    });
    assert_eq!(failure.line, 301);
    assert!(
        matches!(failure.problem, Problem::BrokenLink { .. }),
        "{failure}"
    );
}

#[test]
fn reordering_two_records_is_located() {
    let failure = tampered(|lines| lines.swap(700, 701));
    assert_eq!(failure.line, 701);
    assert!(
        matches!(failure.problem, Problem::BrokenLink { .. }),
        "{failure}"
    );
}

#[test]
fn truncating_a_file_mid_record_is_located() {
    let root = tempfile::tempdir().unwrap();
    write(&config(root.path()), 0..100);
    let file = trail_files(&service_dir(root.path())).unwrap().remove(0);
    let content = std::fs::read(&file).unwrap();
    std::fs::write(&file, &content[..content.len() - 40]).unwrap();
    let failure = verify_dir(&service_dir(root.path())).unwrap_err();
    assert_eq!(failure.line, 100);
    assert_eq!(failure.problem, Problem::TornLine);
}

#[test]
fn truncating_an_earlier_file_breaks_the_link_into_the_next() {
    let root = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        max_file_bytes: 4096,
        ..config(root.path())
    };
    write(&config, 0..200);
    let files = trail_files(&service_dir(root.path())).unwrap();
    assert!(files.len() > 3, "rotation made {} files", files.len());
    let mut lines = lines_of(&files[1]);
    lines.truncate(lines.len() - 2);
    rewrite(&files[1], &lines);
    let failure = verify_dir(&service_dir(root.path())).unwrap_err();
    assert_eq!(failure.file, files[2]);
    assert_eq!(failure.line, 1);
    assert!(
        matches!(failure.problem, Problem::BrokenLink { .. }),
        "{failure}"
    );
}

#[test]
fn the_chain_continues_across_restarts() {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path());
    write(&config, 0..10);
    write(&config, 10..20);
    write(&config, 20..25);
    let report = verify_dir(&service_dir(root.path())).unwrap();
    assert_eq!(report.records, 25);
    assert_eq!(report.last_audit_id, Some(25));
    // Same day, under the size limit: one file, appended to.
    assert_eq!(report.files, 1);
}

#[test]
fn the_chain_continues_across_rotations_and_restarts() {
    let root = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        max_file_bytes: 2048,
        ..config(root.path())
    };
    write(&config, 0..60);
    write(&config, 60..120);
    let report = verify_dir(&service_dir(root.path())).unwrap();
    assert_eq!(report.records, 120);
    assert!(report.files > 5);
    for file in trail_files(&service_dir(root.path())).unwrap() {
        assert!(std::fs::metadata(&file).unwrap().len() <= 2048 + 512);
    }
}

#[test]
fn a_second_writer_on_the_same_directory_fails_at_startup() {
    let root = tempfile::tempdir().unwrap();
    let first = AuditLogger::open(&config(root.path())).unwrap();
    let second = AuditLogger::open(&config(root.path())).unwrap_err();
    assert!(
        second.to_string().contains("locked by another writer"),
        "{second}"
    );
    drop(first);
    // Released on drop.
    AuditLogger::open(&config(root.path())).unwrap();
}

#[test]
fn directory_and_files_are_private() {
    let root = tempfile::tempdir().unwrap();
    write(&config(root.path()), 0..3);
    let dir = service_dir(root.path());
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for file in trail_files(&dir).unwrap() {
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[test]
fn disabled_mode_does_no_io() {
    let root = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        dir: Some(root.path().to_owned()),
        ..AuditConfig::disabled("rbee-hive")
    };
    let logger = AuditLogger::open(&config).unwrap();
    let sink = logger.sink();
    assert!(!sink.is_enabled());
    for i in 0..100 {
        sink.emit(None, event(i));
    }
    assert!(!sink.flush());
    logger.shutdown();
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[test]
fn under_the_disk_reserve_nothing_is_written_and_drops_are_counted() {
    let root = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        min_free_bytes: u64::MAX,
        ..config(root.path())
    };
    let logger = AuditLogger::open(&config).unwrap();
    let sink = logger.sink();
    for i in 0..20 {
        sink.emit(None, event(i));
    }
    assert!(sink.flush());
    logger.shutdown();
    assert_eq!(sink.dropped(), 20);
    assert!(trail_files(&service_dir(root.path())).unwrap().is_empty());
}

#[test]
fn emitting_never_blocks_and_counts_what_the_buffer_could_not_take() {
    let root = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        capacity: 4,
        flush: FlushPolicy::Immediate,
        ..config(root.path())
    };
    let logger = AuditLogger::open(&config).unwrap();
    let sink = logger.sink();
    let started = std::time::Instant::now();
    for i in 0..2000 {
        sink.emit(None, event(i));
    }
    let elapsed = started.elapsed();
    assert!(sink.flush());
    logger.shutdown();
    let written = verify_dir(&service_dir(root.path())).unwrap().records;
    assert!(
        sink.dropped() > 0,
        "an fsync per record cannot keep up with a tight loop"
    );
    assert_eq!(written + sink.dropped(), 2000);
    assert!(
        elapsed < std::time::Duration::from_secs(2),
        "emit blocked: {elapsed:?}"
    );
}

#[test]
fn a_torn_last_line_is_reported_then_acknowledged_and_the_chain_continues() {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path());
    write(&config, 0..5);
    let dir = service_dir(root.path());
    let file = trail_files(&dir).unwrap().remove(0);
    // Simulate a write cut short by power loss: half a record, no newline.
    let sixth = r#"{"audit_id":6,"event":{"event_type":"hive_removed","node_na"#;
    let mut content = std::fs::read(&file).unwrap();
    content.extend_from_slice(sixth.as_bytes());
    std::fs::write(&file, &content).unwrap();

    let failure = verify_dir(&dir).unwrap_err();
    assert_eq!(
        (failure.file.clone(), failure.line, failure.problem.clone()),
        (file.clone(), 6, Problem::TornLine)
    );

    write(&config, 5..8);
    let report = verify_dir(&dir).unwrap();
    assert_eq!(
        report.records,
        5 + 1 + 3,
        "five, the recovery record, three"
    );
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(
        report.warnings[0].contains(":6: torn line"),
        "{:?}",
        report.warnings
    );
    // The torn bytes are kept as evidence, not truncated away.
    assert!(std::fs::read_to_string(&file).unwrap().ends_with("node_na"));
}

#[test]
fn a_torn_line_in_an_earlier_file_is_reported_where_it_is() {
    let root = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        max_file_bytes: 1024,
        ..config(root.path())
    };
    write(&config, 0..30);
    let dir = service_dir(root.path());
    let files = trail_files(&dir).unwrap();
    let mut content = std::fs::read(&files[0]).unwrap();
    content.truncate(content.len() - 1);
    std::fs::write(&files[0], &content).unwrap();
    let failure = verify_dir(&dir).unwrap_err();
    assert_eq!(failure.file, files[0]);
    assert_eq!(failure.problem, Problem::TornLine);
}

#[test]
fn the_independent_python_verifier_in_the_docs_agrees() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/audit.md");
    let text = std::fs::read_to_string(&docs).unwrap();
    let script = text
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/audit.md has a python block");
    let tmp = tempfile::tempdir().unwrap();
    let script_path = tmp.path().join("verify.py");
    std::fs::write(&script_path, script).unwrap();

    let root = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        max_file_bytes: 8192,
        ..config(root.path())
    };
    let logger = AuditLogger::open(&config).unwrap();
    let sink = logger.sink();
    // Non-ASCII and escapes, to exercise canonical string encoding.
    sink.emit(
        Some("r\u{e9}q-1"),
        AuditEvent::ConfigInvalid {
            errors: vec!["bad \"quote\" \\ tab\t newline\n ctl\u{1} caf\u{e9} \u{1F600}".into()],
        },
    );
    for i in 0..150 {
        sink.emit(None, event(i));
    }
    logger.shutdown();
    let dir = service_dir(root.path());
    assert_eq!(verify_dir(&dir).unwrap().records, 151);

    let run = |dir: &Path| {
        std::process::Command::new("python3")
            .arg(&script_path)
            .arg(dir)
            .output()
            .expect("python3 runs")
    };
    let ok = run(&dir);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "OK 151 records");

    let files = trail_files(&dir).unwrap();
    let mut lines = lines_of(&files[1]);
    lines[3] = lines[3].replace("node-", "nodE-");
    rewrite(&files[1], &lines);
    let bad = run(&dir);
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(
        said.contains(&format!("{}:4", audit_logging_file_name(&files[1]))),
        "{said}"
    );
}

fn audit_logging_file_name(path: &Path) -> String {
    path.file_name()
        .expect("file has a name")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_new_day_starts_a_new_file_chained_from_the_last_one() {
    let root = tempfile::tempdir().expect("create a temp dir");
    let config = config(root.path());
    write(&config, 0..3);
    let dir = service_dir(root.path());
    // Back-date the file as if it had been written yesterday.
    let today = trail_files(&dir).expect("list the trail files").remove(0);
    let name = today
        .file_name()
        .expect("file has a name")
        .to_string_lossy()
        .into_owned();
    let yesterday = dir.join(format!(
        "{}-20000101.jsonl",
        &name[..name.len() - "-yyyymmdd.jsonl".len()]
    ));
    std::fs::rename(&today, &yesterday).expect("rename");
    write(&config, 3..5);
    let files = trail_files(&dir).expect("list the trail files");
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0], yesterday);
    assert_eq!(lines_of(&files[1]).len(), 2);
    let report = verify_dir(&dir).expect("chain verifies across the day boundary");
    assert_eq!(report.records, 5);
}

fn today() -> String {
    humantime::format_rfc3339(std::time::SystemTime::now())
        .to_string()
        .chars()
        .take(10)
        .filter(char::is_ascii_digit)
        .collect()
}

#[test]
fn an_empty_newest_file_left_by_a_crash_after_its_creation_is_resumed_into() {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path());
    let dir = service_dir(root.path());
    // Crash between creating the first file ever and writing to it.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let first = dir.join(format!("audit-{:020}-{}.jsonl", 1, today()));
    std::fs::write(&first, b"").unwrap();
    write(&config, 0..3);
    // And again after a rotation: the file for record 4 exists, empty.
    let fourth = dir.join(format!("audit-{:020}-{}.jsonl", 4, today()));
    std::fs::write(&fourth, b"").unwrap();
    write(&config, 3..6);
    let report = verify_dir(&dir).unwrap();
    assert_eq!(report.records, 6);
    assert_eq!(lines_of(&first).len(), 3);
    assert_eq!(lines_of(&fourth).len(), 3, "records 4 to 6 went into it");
}

#[test]
fn a_torn_first_line_of_the_newest_file_is_acknowledged_at_the_next_start() {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path());
    let dir = service_dir(root.path());
    write(&config, 0..3);
    // Crash while writing the first record of a new file.
    let torn = dir.join(format!("audit-{:020}-{}.jsonl", 4, today()));
    std::fs::write(&torn, br#"{"audit_id":4,"event":{"type":"hive_reg"#).unwrap();
    // Used to fail at every start (the next file's name was taken).
    write(&config, 3..6);
    let report = verify_dir(&dir).unwrap();
    assert_eq!(
        report.records,
        3 + 1 + 3,
        "the recovery record, then 3 more"
    );
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let files = trail_files(&dir).unwrap();
    assert_eq!(files.len(), 3);
    assert_eq!(files[1], torn, "left as it was");
    assert!(files[2].to_string_lossy().ends_with("_1.jsonl"));
}
