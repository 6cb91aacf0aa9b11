//! Fault injection for tests (the `fault-injection` cargo feature, off by
//! default): makes the engine misbehave after a number of generated tokens,
//! so stall detection here and crash handling in the hive are tested against
//! a real process.
//!
//! - `RBEE_FAULT_WEDGE_AFTER_TOKENS=N`: the engine thread blocks forever
//!   after the N-th generated token (a wedged GPU, a deadlock).
//! - `RBEE_FAULT_EXIT_AFTER_TOKENS=N`: the process exits with code 101 after
//!   the N-th generated token (a crash).
//! - `RBEE_FAULT_PANIC_AFTER_TOKENS=N`: the engine thread panics after the
//!   N-th generated token (a bug in the engine).
//! - `RBEE_FAULT_LOAD_DELAY_MS=N`: model loading takes N ms longer (a large
//!   model), so the `loading` state can be observed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Exit code of an injected crash.
pub const CRASH_EXIT_CODE: i32 = 101;

struct Faults {
    wedge_after: Option<u64>,
    exit_after: Option<u64>,
    panic_after: Option<u64>,
    load_delay_ms: Option<u64>,
}

fn faults() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let read = |key: &str| std::env::var(key).ok().and_then(|v| v.parse().ok());
        Faults {
            wedge_after: read("RBEE_FAULT_WEDGE_AFTER_TOKENS"),
            exit_after: read("RBEE_FAULT_EXIT_AFTER_TOKENS"),
            panic_after: read("RBEE_FAULT_PANIC_AFTER_TOKENS"),
            load_delay_ms: read("RBEE_FAULT_LOAD_DELAY_MS"),
        }
    })
}

static GENERATED: AtomicU64 = AtomicU64::new(0);

/// Called by the engine after each generated token.
pub fn after_token() {
    let n = GENERATED.fetch_add(1, Ordering::AcqRel) + 1;
    let f = faults();
    if f.exit_after == Some(n) {
        tracing::error!(tokens = n, "fault injection: exiting");
        std::process::exit(CRASH_EXIT_CODE);
    }
    if f.panic_after == Some(n) {
        panic!("fault injection: the engine panics after {n} tokens");
    }
    if f.wedge_after == Some(n) {
        tracing::error!(tokens = n, "fault injection: wedging the engine");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Called before the model is loaded.
pub fn before_load() {
    if let Some(ms) = faults().load_delay_ms {
        tracing::warn!(delay_ms = ms, "fault injection: delaying the model load");
        std::thread::sleep(Duration::from_millis(ms));
    }
}
