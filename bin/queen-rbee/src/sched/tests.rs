//! The scheduler on its own: no HTTP, no hives, a paused view.
use rbee_api::ErrorCode;

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

/// A scheduler, and the receiving end of its spawn orders (kept, or the
/// scheduler fails every spawn as the queen's shutdown would).
fn sched(max_queue: usize) -> (Scheduler, mpsc::Receiver<SpawnOrder>) {
    let mut registry = prometheus_client::registry::Registry::default();
    Scheduler::new(max_queue, QueenMetrics::register(&mut registry))
}

/// A hive as the registry adds it: registered, not yet polled.
fn summary(hive: &str, url: &str) -> HiveSummary {
    HiveSummary {
        node_name: hive.to_owned(),
        url: url.to_owned(),
        source: "registered".to_owned(),
        state: HiveState::Unknown,
        registered_at: String::new(),
        last_seen: None,
        consecutive_misses: 0,
        workers: 0,
        models: Vec::new(),
    }
}

/// A poll's answer from `hive`, which the registry adds first if new.
fn seen(s: &Scheduler, hive: &str, url: &str, workers: Vec<WorkerInfo>, models: Vec<String>) {
    if !s.hives().iter().any(|h| h.node_name == hive) {
        s.hive_added(summary(hive, url));
    }
    s.hive_seen(hive, url, workers, models);
}

/// Hive `h` with model `m` and idle workers `a` and `b` of `slots` each.
fn two_idle_workers(s: &Scheduler, slots: u32) {
    seen(
        s,
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
    let (s, _orders) = sched(8);
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
    let (s, _orders) = sched(2);
    seen(
        &s,
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
    let (s, _orders) = sched(1);
    seen(
        &s,
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
    let (s, _orders) = sched(2);
    seen(&s, "h", "http://h", vec![], vec!["m".into()]);
    assert_eq!(
        s.admit_for("x", "req", None).unwrap_err().code(),
        ErrorCode::ModelNotFound
    );
    s.hive_missed("h", "http://h", 1, "no answer");
    assert_eq!(
        s.admit_for("m", "req", None).unwrap_err().code(),
        ErrorCode::NoCapacity
    );
    assert_eq!(s.counts().hives_unreachable, 1);
}

#[tokio::test]
async fn waiters_without_a_worker_cause_exactly_one_spawn() {
    let (s, mut orders) = sched(8);
    seen(&s, "h", "http://h", vec![], vec!["m".into()]);
    let mut tickets: Vec<Ticket> = (0..3)
        .map(|_| s.admit_for("m", "req", None).unwrap())
        .collect();
    assert_eq!(orders.try_recv().map(|o| o.hive).as_deref(), Ok("h"));
    assert!(orders.try_recv().is_err(), "one spawn for three waiters");
    seen(
        &s,
        "h",
        "http://h",
        vec![worker("a", "m", WorkerState::Idle, 3)],
        vec!["m".into()],
    );
    s.spawn_finished("m", Ok(()));
    for t in &mut tickets {
        let _ = granted(t).await;
    }
    assert!(orders.try_recv().is_err(), "still one spawn");
}

#[tokio::test]
async fn a_failed_spawn_fails_the_waiters_with_no_capacity() {
    let (s, _orders) = sched(8);
    seen(&s, "h", "http://h", vec![], vec!["m".into()]);
    let mut t = s.admit_for("m", "req", None).unwrap();
    s.spawn_finished(
        "m",
        Err(SpawnError::Refused {
            code: ErrorCode::InsufficientRam,
            message: "not enough RAM".to_owned(),
        }),
    );
    let err = t.wait().await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoCapacity);
    assert!(err.to_string().contains("not enough RAM"), "{err}");
}

#[tokio::test]
async fn a_busy_worker_is_passed_over_and_try_other_skips_the_failed_one() {
    let (s, _orders) = sched(8);
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
    let (s, _orders) = sched(8);
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

#[tokio::test]
async fn a_spawn_that_cannot_be_started_fails_its_waiters_at_once() {
    let (s, orders) = sched(8);
    // Nobody starts spawns any more (the queen is stopping).
    drop(orders);
    seen(&s, "h", "http://h", vec![], vec!["m".into()]);
    let mut ticket = s.admit_for("m", "req", None).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(1), ticket.wait())
        .await
        .expect("answered at once")
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoCapacity);
}

mod routing {
    //! The scheduler against random traffic: what it grants is checked
    //! after every step against the fleet it was shown.
    use super::*;
    use proptest::prelude::*;

    const MODELS: [&str; 2] = ["m0", "m1"];
    const HIVES: [&str; 2] = ["h0", "h1"];

    /// A worker of the fleet: its hive, model and slots never change, its
    /// state does.
    #[derive(Debug, Clone)]
    struct Spec {
        hive: usize,
        model: usize,
        slots: u32,
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A request for a model arrives.
        Admit(usize),
        /// A granted request ends (the n-th lease held, modulo).
        Finish(usize),
        /// A waiting client goes away (the n-th ticket, modulo).
        Leave(usize),
        /// A hive's poll reports each of its workers' states.
        Poll(usize, Vec<WorkerState>),
        /// A hive stops answering.
        Unreachable(usize),
    }

    fn state() -> impl Strategy<Value = WorkerState> {
        prop_oneof![
            3 => Just(WorkerState::Idle),
            2 => Just(WorkerState::Busy),
            1 => Just(WorkerState::Loading),
            1 => Just(WorkerState::Failed),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            5 => (0..MODELS.len()).prop_map(Step::Admit),
            4 => any::<usize>().prop_map(Step::Finish),
            1 => any::<usize>().prop_map(Step::Leave),
            2 => ((0..HIVES.len()), prop::collection::vec(state(), 6)).prop_map(|(h, s)| Step::Poll(h, s)),
            1 => (0..HIVES.len()).prop_map(Step::Unreachable),
        ]
    }

    fn poll(s: &Scheduler, fleet: &[Spec], hive: usize, states: &[WorkerState]) {
        let workers = fleet
            .iter()
            .enumerate()
            .filter(|(_, w)| w.hive == hive)
            .map(|(i, w)| {
                worker(
                    &format!("w{i}"),
                    MODELS[w.model],
                    states[i % states.len()],
                    w.slots,
                )
            })
            .collect();
        seen(
            s,
            HIVES[hive],
            &format!("http://{}", HIVES[hive]),
            workers,
            MODELS.iter().map(|m| (*m).to_owned()).collect(),
        );
    }

    /// Whether `w` could take one more of `model`'s requests now.
    fn has_room(w: &FleetWorker, model: &str) -> bool {
        w.info.model_ref == model
            && matches!(w.info.state, WorkerState::Idle | WorkerState::Busy)
            && w.hive_reachable
            && w.outstanding < w.info.slots_total.max(1)
    }

    proptest! {
        #[test]
        fn pick_chooses_an_eligible_worker_whenever_there_is_one(
            slots in prop::collection::vec(
                (0..HIVES.len(), 0..MODELS.len(), state(), 1u32..4, 0u32..5, any::<bool>(), any::<bool>()),
                0..8,
            ),
            unreachable in prop::collection::vec(any::<bool>(), HIVES.len()),
            rr in any::<usize>(),
        ) {
            let now = Instant::now();
            let mut st = State::default();
            for (h, name) in HIVES.iter().enumerate() {
                let mut hive = summary(name, "");
                hive.state = if unreachable[h] { HiveState::Unreachable } else { HiveState::Reachable };
                st.hives.insert((*name).to_owned(), hive);
            }
            for (i, (h, m, state, slots_total, outstanding, avoided, _)) in slots.iter().enumerate() {
                let key = format!("{}/w{i}", HIVES[*h]);
                st.slots.insert(key, Slot {
                    hive: HIVES[*h].to_owned(),
                    info: worker(&format!("w{i}"), MODELS[*m], *state, *slots_total),
                    outstanding: *outstanding,
                    avoid_until: avoided.then(|| now + Duration::from_secs(1)),
                });
            }
            st.queues.entry("m0".to_owned()).or_default().rr = rr;
            let exclude = slots.iter().position(|s| s.6).map(|i| format!("{}/w{i}", HIVES[slots[i].0]));
            let eligible = |key: &str| {
                let s = &st.slots[key];
                s.info.model_ref == "m0"
                    && matches!(s.info.state, WorkerState::Idle | WorkerState::Busy)
                    && !unreachable[HIVES.iter().position(|h| *h == s.hive).expect("hive")]
                    && s.outstanding < s.info.slots_total
                    && s.avoid_until.is_none()
                    && Some(key) != exclude.as_deref()
            };
            let any_eligible = st.slots.keys().any(|k| eligible(k));
            match pick(&st, "m0", exclude.as_deref(), None, now) {
                Some((key, _)) => {
                    prop_assert!(eligible(&key), "picked {key}, which has no room");
                    let least = st.slots.iter().filter(|(k, _)| eligible(k)).map(|(_, s)| s.outstanding).min();
                    prop_assert_eq!(Some(st.slots[&key].outstanding), least, "not the least busy");
                }
                None => prop_assert!(!any_eligible, "nothing picked beside a free worker"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn never_over_capacity_and_never_a_waiter_beside_a_free_worker(
            fleet in prop::collection::vec(
                ((0..HIVES.len()), (0..MODELS.len()), 1u32..4).prop_map(|(hive, model, slots)| Spec { hive, model, slots }),
                1..6,
            ),
            steps in prop::collection::vec(step(), 1..60),
        ) {
            let (s, mut orders) = sched(64);
            for h in 0..HIVES.len() {
                poll(&s, &fleet, h, &[WorkerState::Idle]);
            }
            let mut leases: Vec<(usize, Lease)> = Vec::new();
            let mut tickets: Vec<(usize, Ticket)> = Vec::new();
            for step in steps {
                match step {
                    Step::Admit(m) => match s.admit_for(MODELS[m], "req", None) {
                        Ok(t) => tickets.push((m, t)),
                        Err(e) => prop_assert!(
                            matches!(e.code(), ErrorCode::NoCapacity | ErrorCode::QueueFull),
                            "refused with {:?}", e.code()
                        ),
                    },
                    Step::Finish(n) if !leases.is_empty() => {
                        let at = n % leases.len();
                        drop(leases.swap_remove(at));
                    }
                    Step::Leave(n) if !tickets.is_empty() => {
                        let at = n % tickets.len();
                        drop(tickets.swap_remove(at));
                    }
                    Step::Poll(h, states) => poll(&s, &fleet, h, &states),
                    Step::Unreachable(h) => s.hive_missed(HIVES[h], &format!("http://{}", HIVES[h]), 1, "no answer"),
                    Step::Finish(_) | Step::Leave(_) => {}
                }
                while orders.try_recv().is_ok() {}
                // Collect what the scheduler granted or refused.
                let mut waiting = Vec::new();
                for (m, mut t) in tickets.drain(..) {
                    match t.rx.try_recv() {
                        Ok(Ok(lease)) => {
                            let (hive, id) = lease.key().split_once('/').expect("hive/worker key");
                            let i: usize = id.trim_start_matches('w').parse().expect("worker index");
                            prop_assert_eq!(HIVES[fleet[i].hive], hive);
                            prop_assert_eq!(fleet[i].model, m, "a lease on a worker of another model");
                            leases.push((m, lease));
                        }
                        Ok(Err(e)) => prop_assert_eq!(e.code(), ErrorCode::NoCapacity),
                        Err(_) => waiting.push((m, t)),
                    }
                }
                tickets = waiting;
                let workers = s.workers();
                for w in &workers {
                    prop_assert!(
                        w.outstanding <= w.info.slots_total.max(1),
                        "{} holds {} requests with {} slots", w.info.worker_id, w.outstanding, w.info.slots_total
                    );
                }
                for (m, _) in &tickets {
                    prop_assert!(
                        !workers.iter().any(|w| has_room(w, MODELS[*m])),
                        "a request for {} waits while a worker has room", MODELS[*m]
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn a_passed_over_worker_is_used_again_when_its_time_is_up() {
    let (s, _orders) = sched(8);
    s.run_rechecks(CancellationToken::new());
    seen(
        &s,
        "h",
        "http://h",
        vec![worker("a", "m", WorkerState::Idle, 1)],
        vec!["m".into()],
    );
    let mut t = s.admit_for("m", "req", None).unwrap();
    let passed_over = Instant::now();
    granted(&mut t).await.busy();
    // Nothing else happens: the recheck task alone hands the place out.
    let mut t = s.admit_for("m", "req", None).unwrap();
    assert!(t.rx.try_recv().is_err(), "passed over at first");
    let lease = granted(&mut t).await;
    assert_eq!(lease.key(), "h/a");
    assert!(passed_over.elapsed() >= BUSY_AVOID);
}
