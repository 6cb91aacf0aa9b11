//! The scheduler on its own: no HTTP, no hives, a paused view.
use super::*;

fn worker(id: &str, model: &str, state: WorkerState, slots: u32) -> WorkerInfo {
    WorkerInfo {
        worker_id: id.to_owned(),
        pid: None,
        port: None,
        url: Some(format!("http://{id}")),
        model_ref: model.to_owned(),
        backend: rbee_api::worker::Backend::Cpu,
        device: 0,
        state,
        restart_count: 0,
        last_restart: None,
        last_heartbeat: None,
        failed_health_checks: 0,
        started_at: String::new(),
        slots_total: slots,
        vram_bytes: 0,
        failure: None,
    }
}

fn sched(max_queue: usize) -> Scheduler {
    let mut registry = prometheus_client::registry::Registry::default();
    Scheduler::new(max_queue, QueenMetrics::register(&mut registry))
}

/// Hive `h` with model `m` and idle workers `a` and `b` of `slots` each.
fn two_idle_workers(s: &Scheduler, slots: u32) {
    s.hive_seen(
        "h",
        "http://h",
        vec![
            worker("a", "m", WorkerState::Idle, slots),
            worker("b", "m", WorkerState::Idle, slots),
        ],
        vec!["m".into()],
    );
}

async fn granted(ticket: &mut Ticket) -> Lease {
    tokio::time::timeout(Duration::from_secs(1), ticket.wait())
        .await
        .expect("granted in time")
        .expect("a lease")
}

#[tokio::test]
async fn least_outstanding_wins_and_ties_go_round_robin() {
    let s = sched(8);
    two_idle_workers(&s, 4);
    let mut first = s.admit_for("m", "req", None).unwrap();
    let l1 = granted(&mut first).await;
    let mut second = s.admit_for("m", "req", None).unwrap();
    let l2 = granted(&mut second).await;
    assert_ne!(l1.key(), l2.key(), "the second goes to the idle worker");
    let (k1, k2) = (l1.key().to_owned(), l2.key().to_owned());
    drop(l1);
    let mut third = s.admit_for("m", "req", None).unwrap();
    let l3 = granted(&mut third).await;
    assert_eq!(l3.key(), k1, "the worker with fewer outstanding wins");
    drop((l2, l3));
    let picks: Vec<String> = futures_util::future::join_all((0..4).map(|_| async {
        let mut t = s.admit_for("m", "req", None).unwrap();
        granted(&mut t).await.key().to_owned()
    }))
    .await;
    assert!(picks.contains(&k1) && picks.contains(&k2), "{picks:?}");
}

#[tokio::test]
async fn a_full_worker_queues_and_a_release_hands_over_in_order() {
    let s = sched(2);
    s.hive_seen(
        "h",
        "http://h",
        vec![worker("a", "m", WorkerState::Busy, 1)],
        vec!["m".into()],
    );
    let mut t0 = s.admit_for("m", "req", None).unwrap();
    let l0 = granted(&mut t0).await;
    let mut t1 = s.admit_for("m", "req", None).unwrap();
    let mut t2 = s.admit_for("m", "req", None).unwrap();
    let err = s.admit_for("m", "req", None).unwrap_err();
    assert_eq!(err.code(), ErrorCode::QueueFull);
    drop(l0);
    let l1 = granted(&mut t1).await;
    assert!(t2.rx.try_recv().is_err(), "the second waiter still waits");
    drop(l1);
    let _l2 = granted(&mut t2).await;
}

#[tokio::test]
async fn a_reloaded_queue_bound_applies_to_the_next_request() {
    let s = sched(1);
    s.hive_seen(
        "h",
        "http://h",
        vec![worker("a", "m", WorkerState::Busy, 1)],
        vec!["m".into()],
    );
    let mut t0 = s.admit_for("m", "req", None).unwrap();
    let _l0 = granted(&mut t0).await;
    let _t1 = s.admit_for("m", "req", None).unwrap();
    assert_eq!(
        s.admit_for("m", "req", None).unwrap_err().code(),
        ErrorCode::QueueFull
    );
    s.set_max_queue(2);
    assert_eq!(s.max_queue(), 2);
    let _t2 = s
        .admit_for("m", "req", None)
        .expect("room under the larger bound");
    s.set_max_queue(1);
    // The two already waiting keep their places; a new one is refused.
    assert_eq!(
        s.admit_for("m", "req", None).unwrap_err().code(),
        ErrorCode::QueueFull
    );
}

#[tokio::test]
async fn unknown_models_are_404_and_unreachable_hives_are_503() {
    let s = sched(2);
    s.hive_seen("h", "http://h", vec![], vec!["m".into()]);
    assert_eq!(
        s.admit_for("x", "req", None).unwrap_err().code(),
        ErrorCode::ModelNotFound
    );
    s.hive_unreachable("h", "http://h");
    assert_eq!(
        s.admit_for("m", "req", None).unwrap_err().code(),
        ErrorCode::NoCapacity
    );
    assert_eq!(s.counts().hives_unreachable, 1);
}

#[tokio::test]
async fn waiters_without_a_worker_cause_exactly_one_spawn() {
    let s = sched(8);
    let orders = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&orders);
    s.set_spawner(move |o: SpawnOrder| seen.lock().push(o.hive));
    s.hive_seen("h", "http://h", vec![], vec!["m".into()]);
    let mut tickets: Vec<Ticket> = (0..3)
        .map(|_| s.admit_for("m", "req", None).unwrap())
        .collect();
    assert_eq!(orders.lock().as_slice(), ["h"]);
    s.hive_seen(
        "h",
        "http://h",
        vec![worker("a", "m", WorkerState::Idle, 3)],
        vec!["m".into()],
    );
    s.spawn_finished("m", Ok(()));
    for t in &mut tickets {
        let _ = granted(t).await;
    }
    assert_eq!(orders.lock().len(), 1);
}

#[tokio::test]
async fn a_failed_spawn_fails_the_waiters_with_no_capacity() {
    let s = sched(8);
    s.set_spawner(|_| {});
    s.hive_seen("h", "http://h", vec![], vec!["m".into()]);
    let mut t = s.admit_for("m", "req", None).unwrap();
    s.spawn_finished(
        "m",
        Err(ApiError::new(ErrorCode::InsufficientRam, "not enough RAM")),
    );
    let err = t.wait().await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoCapacity);
    assert!(err.body().error.message.contains("not enough RAM"));
}

#[tokio::test]
async fn a_busy_worker_is_passed_over_and_try_other_skips_the_failed_one() {
    let s = sched(8);
    two_idle_workers(&s, 1);
    let mut t = s.admit_for("m", "req", None).unwrap();
    let lease = granted(&mut t).await;
    let failed = lease.key().to_owned();
    let other = s.try_other("m", &failed).expect("the other worker");
    assert_ne!(other.key(), failed);
    assert!(
        s.try_other("m", &failed).is_none(),
        "no third place: both workers are full"
    );
    lease.busy();
    let mut t = s.admit_for("m", "req", None).unwrap();
    assert!(
        t.rx.try_recv().is_err(),
        "a worker that said busy is avoided"
    );
    drop(other);
    assert_ne!(granted(&mut t).await.key(), failed);
}

#[tokio::test]
async fn a_conversation_returns_to_its_worker_while_that_worker_has_room() {
    let s = sched(8);
    two_idle_workers(&s, 2);
    let mut t = s.admit_for("m", "req", Some(7)).unwrap();
    let first = granted(&mut t).await;
    let home = first.key().to_owned();
    drop(first);
    // Round robin alone would alternate; the conversation stays.
    for _ in 0..4 {
        let mut t = s.admit_for("m", "req", Some(7)).unwrap();
        assert_eq!(granted(&mut t).await.key(), home);
    }
    // Its worker full (two places, both taken), the next turn goes to the
    // other worker rather than wait.
    let mut a = s.admit_for("m", "req", Some(7)).unwrap();
    let la = granted(&mut a).await;
    let mut b = s.admit_for("m", "req", Some(7)).unwrap();
    let lb = granted(&mut b).await;
    assert_eq!((la.key(), lb.key()), (home.as_str(), home.as_str()));
    let mut c = s.admit_for("m", "req", Some(7)).unwrap();
    let lc = granted(&mut c).await;
    let moved = lc.key().to_owned();
    assert_ne!(moved, home);
    // Its latest turn's cache is there now: the next turn follows it.
    drop((la, lb, lc));
    let mut d = s.admit_for("m", "req", Some(7)).unwrap();
    assert_eq!(granted(&mut d).await.key(), moved);
}
