//! The inference engine: one thread that owns the model and runs every
//! active sequence together, so the async runtime never waits on the model
//! and probes answer while a generation runs.
//!
//! Continuous batching. A step is one forward pass over every active
//! sequence: the next token of each generating sequence, then chunks of
//! waiting prompts (oldest first) up to [`PREFILL_CHUNK`] rows in all, so
//! the weights are read once per step for everyone and a long prompt
//! delays the others' next token by at most one chunk. Sequences join and
//! leave between steps: a new request starts its prefill at the next step,
//! and a finished, cancelled or expired one gives its place back at once.
//!
//! A request holds a slot ([`Engine::try_reserve`], never blocking; when
//! all are taken the HTTP side answers 503 `ALL_SLOTS_BUSY`) and, once
//! admitted, KV cache blocks from a shared pool ([`blocks`]): all it can
//! come to need is reserved at admission, so no sequence runs out of
//! memory midway; a request the pool cannot take yet waits (its deadline
//! and cancellation still apply). A prompt that starts with tokens already
//! in the cache skips their prefill (prefix reuse). Between steps the
//! engine checks each sequence's cancellation and deadline, so a
//! disconnect, a `DELETE` or an expired deadline stops it within one step.

pub(crate) mod blocks;
pub(crate) mod detokenizer;
#[cfg(feature = "fault-injection")]
pub(crate) mod fault;
pub mod metrics;
pub mod sampler;
pub(crate) mod stop;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbee_api::health::Capacity;
use rbee_api::inference::{StopReason, StreamEvent, TokenLogprob, TopLogprob};
use rbee_api::{ErrorCode, Outcome};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use self::blocks::{BlockPool, SeqBlocks};
use self::detokenizer::Detokenizer;
use self::metrics::WorkerMetrics;
use self::sampler::{Sampler, SamplingParams};
use self::stop::{StopCheck, StopMatcher};
use crate::model::grammar::{self, Grammar};
use crate::model::llama::{BlockTables, Forward, ForwardError, Row, KV_BLOCK};
use crate::model::PREFILL_CHUNK;

/// What a running job reports, in order: `Token`s, then one `End` or
/// `Error` (the wire's stream events; the HTTP side adds `Started`).
pub type JobEvent = StreamEvent;

/// One request for the engine.
#[derive(Debug)]
pub struct Job {
    /// Job id.
    pub job_id: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Generate past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<u32>,
    /// What the answer must match: only the tokens it allows are sampled.
    pub grammar: Option<Grammar>,
    /// The request that started the job, for the engine's log lines.
    pub request_id: String,
    /// When to give up.
    pub deadline: Option<Instant>,
    /// Cancelled by a disconnect, a `DELETE` or shutdown.
    pub cancel: CancellationToken,
    /// Where events go.
    pub events: UnboundedSender<JobEvent>,
}

/// A reserved slot; released when dropped (by the engine when the job ends,
/// or by the caller when it never submits).
#[derive(Debug)]
pub struct SlotPermit {
    state: Arc<Shared>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.requests_running.dec();
    }
}

#[derive(Debug)]
struct Shared {
    slots: usize,
    active: AtomicUsize,
    /// Milliseconds since `epoch` of the last decode step (progress).
    last_progress_ms: AtomicU64,
    epoch: Instant,
    metrics: WorkerMetrics,
    /// Set when the worker's drain time is up: every job ends with `SHUTTING_DOWN`.
    abort: AtomicBool,
}

/// Cloneable handle to the engine thread.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: SyncSender<(Job, SlotPermit)>,
    shared: Arc<Shared>,
}

impl Engine {
    /// Start the engine thread over `model`, running up to `slots`
    /// sequences at once in its KV cache pool. Should the thread panic,
    /// its jobs end with an error and `on_death` is called with what
    /// happened: a worker without an engine must not stay up looking ready.
    pub fn start(
        model: Box<dyn Forward>,
        tokenizer: tokenizers::Tokenizer,
        eos: Vec<u32>,
        metrics: WorkerMetrics,
        slots: usize,
        on_death: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<Self> {
        let limits = model.limits();
        let slots = slots.max(1);
        metrics.kv_blocks_total.set(limits.blocks as i64);
        metrics.kv_blocks_free.set(limits.blocks as i64);
        let shared = Arc::new(Shared {
            slots,
            active: AtomicUsize::new(0),
            last_progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
            abort: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::sync_channel(slots);
        let batcher = Batcher {
            model,
            pool: BlockPool::new(limits.blocks),
            rows: Vec::with_capacity(limits.max_rows),
            tables: BlockTables::new(),
            batch: Vec::with_capacity(slots),
            logits: Vec::with_capacity(limits.vocab),
            raw: Vec::new(),
            top: Vec::new(),
            max_rows: limits.max_rows.min(PREFILL_CHUNK),
            ctx: Context {
                tokenizer,
                eos,
                context_length: limits.context,
                shared: Arc::clone(&shared),
            },
        };
        std::thread::Builder::new()
            .name("engine".to_owned())
            .spawn(move || {
                // Unwinding drops the running jobs' event senders, so their
                // streams end with an error at once.
                let run =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batcher.run(rx)));
                if let Err(panic) = run {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    on_death(format!("the engine thread panicked: {what}"));
                }
            })?;
        Ok(Self { tx, shared })
    }

    /// Take a slot if one is free; never blocks.
    pub fn try_reserve(&self) -> Option<SlotPermit> {
        let s = &self.shared;
        let mut current = s.active.load(Ordering::Acquire);
        loop {
            if current >= s.slots {
                return None;
            }
            match s.active.compare_exchange(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    s.metrics.requests_running.inc();
                    return Some(SlotPermit {
                        state: Arc::clone(s),
                    });
                }
                Err(now) => current = now,
            }
        }
    }

    /// Hand a job to the engine.
    pub fn submit(&self, job: Job, permit: SlotPermit) -> Result<(), ErrorCode> {
        match self.tx.try_send((job, permit)) {
            Ok(()) => Ok(()),
            // The channel holds as many jobs as there are slots, and a job
            // needs a slot: full means the engine thread is gone.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(ErrorCode::Internal),
        }
    }

    /// End every running job at its next step with a `SHUTTING_DOWN` error
    /// event (the drain time is up).
    pub fn abort_all(&self) {
        self.shared.abort.store(true, Ordering::Release);
    }

    /// Slots in use.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Slots in all.
    pub fn slots(&self) -> usize {
        self.shared.slots
    }

    /// Capacity in use, for the readiness probe: slots, and KV cache
    /// blocks (as last published by the engine thread).
    pub fn capacity(&self) -> Capacity {
        let m = &self.shared.metrics;
        Capacity {
            slots_total: self.shared.slots,
            slots_running: self.active(),
            requests_waiting: m.requests_waiting.get(),
            kv_blocks_total: m.kv_blocks_total.get(),
            kv_blocks_used: m.kv_blocks_used.get(),
            kv_blocks_free: m.kv_blocks_free.get(),
            kv_blocks_cached: m.kv_blocks_cached.get(),
        }
    }

    /// How long the engine has had work without finishing a step, if it has work.
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.active() == 0 {
            return None;
        }
        let last = Duration::from_millis(self.shared.last_progress_ms.load(Ordering::Acquire));
        Some(self.shared.epoch.elapsed().saturating_sub(last))
    }
}

/// What the engine thread owns: the model, the KV block pool and the
/// buffers of a step; it admits jobs and runs one batched pass per step.
struct Batcher {
    model: Box<dyn Forward>,
    /// The KV cache's blocks.
    pool: BlockPool,
    /// The rows of the current step, reused.
    rows: Vec<Row>,
    /// The block tables of the current step, reused.
    tables: BlockTables,
    /// Per sequence in the current step: its index in `active`, its rows,
    /// and whether its last row gives logits. Reused.
    batch: Vec<(usize, usize, bool)>,
    /// The logits being sampled, reused.
    logits: Vec<f32>,
    /// The logits as the model gave them, kept for log-probabilities
    /// (sampling changes `logits`), reused.
    raw: Vec<f32>,
    /// The most likely tokens of a position, reused.
    top: Vec<(u32, f32)>,
    /// Rows per step.
    max_rows: usize,
    ctx: Context,
}

/// What finishing a token needs besides the model.
struct Context {
    tokenizer: tokenizers::Tokenizer,
    eos: Vec<u32>,
    context_length: usize,
    shared: Arc<Shared>,
}

/// A job not yet admitted to the pool.
struct Waiting {
    job: Job,
    permit: SlotPermit,
    received: Instant,
}

struct Sequence {
    job: Job,
    _permit: SlotPermit,
    /// Its KV cache blocks.
    blocks: SeqBlocks,
    sampler: Sampler,
    /// The job's constraint, if any.
    grammar: Option<Grammar>,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Prompt tokens whose K/V came from the prefix cache.
    cached: usize,
    /// Tokens whose K/V rows are in the cache.
    fed: usize,
    generated: u32,
    received: Instant,
    first_step: Option<Instant>,
    last_token: Option<Instant>,
}

enum Step {
    Running,
    /// The sequence is over; its terminal event (`End` or `Error`) is sent
    /// only after its slot and blocks are back, so a client that sends its
    /// next request as soon as this one ends finds the slot free.
    Done(Outcome, JobEvent),
}

/// Why a job ends before its next step, if it does.
fn interrupted(job: &Job, shared: &Shared, generated: u32) -> Option<(Outcome, JobEvent)> {
    if job.cancel.is_cancelled() || job.events.is_closed() {
        return Some((
            Outcome::Cancelled,
            JobEvent::Error {
                code: ErrorCode::Cancelled,
                message: "the request was cancelled".to_owned(),
            },
        ));
    }
    if shared.abort.load(Ordering::Acquire) {
        return Some((
            Outcome::Cancelled,
            JobEvent::Error {
                code: ErrorCode::ShuttingDown,
                message: "the worker is shutting down and its drain time is up".to_owned(),
            },
        ));
    }
    if job.deadline.is_some_and(|d| Instant::now() >= d) {
        return Some((
            Outcome::DeadlineExceeded,
            JobEvent::Error {
                code: ErrorCode::DeadlineExceeded,
                message: format!("the deadline passed after {generated} generated tokens"),
            },
        ));
    }
    None
}

fn step_failed(error: &ForwardError, jobs: &[&Job]) -> JobEvent {
    for job in jobs {
        tracing::error!(
            job_id = %job.job_id,
            request_id = %job.request_id,
            error = %error,
            "decode step failed"
        );
    }
    JobEvent::Error {
        code: ErrorCode::Internal,
        message: "the decode step failed; see the worker's log".to_owned(),
    }
}

fn grammar_failed(job: &Job, why: &str) -> JobEvent {
    tracing::error!(job_id = %job.job_id, request_id = %job.request_id, error = why, "constrained decoding failed");
    JobEvent::Error {
        code: ErrorCode::Internal,
        message: "constrained decoding failed; see the worker's log".to_owned(),
    }
}

impl Batcher {
    fn run(mut self, rx: Receiver<(Job, SlotPermit)>) {
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        let mut active: Vec<Sequence> = Vec::new();
        let mut done: Vec<(usize, Outcome, JobEvent)> = Vec::new();
        loop {
            if active.is_empty() && waiting.is_empty() {
                match rx.recv() {
                    Ok((job, permit)) => waiting.push_back(Waiting {
                        job,
                        permit,
                        received: Instant::now(),
                    }),
                    Err(_) => return,
                }
            }
            while let Ok((job, permit)) = rx.try_recv() {
                waiting.push_back(Waiting {
                    job,
                    permit,
                    received: Instant::now(),
                });
            }
            self.admit(&mut waiting, &mut active);
            for (i, seq) in active.iter().enumerate() {
                if let Some((outcome, event)) =
                    interrupted(&seq.job, &self.ctx.shared, seq.generated)
                {
                    done.push((i, outcome, event));
                }
            }
            if done.is_empty() && !active.is_empty() {
                self.step(&mut active, &mut done);
                self.ctx.mark_progress();
            }
            self.finish(&mut active, &mut done);
            self.publish(waiting.len());
        }
    }

    /// Admit waiting jobs in arrival order while the pool can take them;
    /// end those cancelled or expired while they waited.
    fn admit(&mut self, waiting: &mut VecDeque<Waiting>, active: &mut Vec<Sequence>) {
        while let Some(w) = waiting.front() {
            if let Some((outcome, event)) = interrupted(&w.job, &self.ctx.shared, 0) {
                let Some(w) = waiting.pop_front() else { break };
                self.ctx
                    .shared
                    .metrics
                    .request_finished(outcome, w.received.elapsed().as_secs_f64());
                drop(w.permit);
                let _ = w.job.events.send(event);
                continue;
            }
            let prompt = &w.job.prompt;
            // The last prompt token is always computed: its logits give the
            // first generated token.
            let prefix = self.pool.lookup(prompt, prompt.len().saturating_sub(1));
            let positions = (prompt.len() + w.job.max_tokens as usize).min(self.ctx.context_length);
            let Some(mut blocks) = self.pool.admit(&prefix, positions.div_ceil(KV_BLOCK)) else {
                break;
            };
            let Some(w) = waiting.pop_front() else { break };
            let mut cached = prefix.shared.len() * KV_BLOCK;
            if let Some((from, n)) = prefix.copy {
                if let Some(to) = self.pool.allocate(&mut blocks, Some(from)) {
                    match self.model.copy_block(from as usize, to as usize, n) {
                        Ok(()) => cached += n,
                        Err(e) => {
                            tracing::warn!(error = %e, "prefix copy failed; the prompt is computed")
                        }
                    }
                }
            }
            self.ctx.mark_progress();
            let m = &self.ctx.shared.metrics;
            m.prompt_tokens.inc_by(w.job.prompt.len() as u64);
            if cached > 0 {
                m.prefix_cache_hits.inc();
                m.prompt_tokens_cached.inc_by(cached as u64);
            }
            let tokens = w.job.prompt.clone();
            let mut job = w.job;
            active.push(Sequence {
                grammar: job.grammar.take(),
                sampler: Sampler::new(job.sampling),
                stop: StopMatcher::new(&job.stop),
                prompt_len: tokens.len(),
                tokens,
                job,
                _permit: w.permit,
                blocks,
                cached,
                fed: cached,
                detokenizer: Detokenizer::new(),
                generated: 0,
                received: w.received,
                first_step: None,
                last_token: None,
            });
        }
    }

    /// One forward pass over the active sequences: one row for each that
    /// generates, then prompt chunks, oldest first, up to `max_rows`.
    fn step(&mut self, active: &mut [Sequence], done: &mut Vec<(usize, Outcome, JobEvent)>) {
        let Self {
            model,
            pool,
            rows,
            tables,
            batch,
            logits,
            raw,
            top,
            max_rows,
            ctx,
        } = self;
        rows.clear();
        tables.clear();
        batch.clear();
        let mut budget = *max_rows;
        for generating in [true, false] {
            for (i, seq) in active.iter_mut().enumerate() {
                let pending = seq.tokens.len() - seq.fed;
                if (pending == 1) != generating || budget == 0 {
                    continue;
                }
                let n = pending.min(budget);
                let end = seq.fed + n;
                while seq.blocks.table.len() * KV_BLOCK < end {
                    if pool.allocate(&mut seq.blocks, None).is_none() {
                        break;
                    }
                }
                if seq.blocks.table.len() * KV_BLOCK < end {
                    // Cannot happen: admission reserved every block.
                    tracing::error!(job_id = %seq.job.job_id, "no KV block left in the reservation");
                    done.push((
                        i,
                        Outcome::Error,
                        JobEvent::Error {
                            code: ErrorCode::Internal,
                            message: "the KV cache reservation ran out".to_owned(),
                        },
                    ));
                    continue;
                }
                budget -= n;
                let table = tables.push(seq.blocks.table.iter().copied());
                rows.extend((seq.fed..end).map(|pos| Row {
                    token: seq.tokens[pos],
                    seq: table,
                    pos,
                    logits: pos + 1 == seq.tokens.len(),
                }));
                batch.push((i, n, end == seq.tokens.len()));
                if seq.first_step.is_none() {
                    seq.first_step = Some(Instant::now());
                }
            }
        }
        if rows.is_empty() {
            return;
        }
        // The constrained sequences' masks for this step depend only on the
        // tokens they have taken so far: computed on a thread of their own
        // while the forward pass runs, so a slow grammar does not add its
        // time to everyone's step.
        let mut grammars: Vec<(usize, &mut Grammar)> = active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| batch.iter().any(|&(j, _, wants)| j == *i && wants))
            .filter_map(|(i, seq)| seq.grammar.as_mut().map(|g| (i, g)))
            .collect();
        let (out, masks) = if !grammars.is_empty() {
            std::thread::scope(|scope| {
                let masking = scope.spawn(move || {
                    grammars
                        .iter_mut()
                        .map(|(i, g)| (*i, g.mask()))
                        .collect::<Vec<_>>()
                });
                let out = model.forward(rows, tables);
                let masks = masking.join().unwrap_or_else(|_| Vec::new());
                (out, masks)
            })
        } else {
            (model.forward(rows, tables), Vec::new())
        };
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let jobs: Vec<&Job> = batch.iter().map(|&(i, _, _)| &active[i].job).collect();
                let event = step_failed(&e, &jobs);
                for &(i, _, _) in batch.iter() {
                    // Whatever the pass wrote is not trusted.
                    active[i].fed = 0;
                    done.push((i, Outcome::Error, event.clone()));
                }
                return;
            }
        };
        ctx.shared.metrics.engine_steps.inc();
        ctx.shared
            .metrics
            .engine_step_rows
            .inc_by(rows.len() as u64);
        let mut k = 0;
        for &(i, n, wants) in batch.iter() {
            let seq = &mut active[i];
            seq.fed += n;
            pool.register_full(&mut seq.blocks, &seq.tokens, seq.fed);
            if !wants {
                continue;
            }
            logits.clear();
            logits.extend_from_slice(out.row(k));
            k += 1;
            let want_logprobs = seq.job.logprobs;
            if want_logprobs.is_some() {
                raw.clear();
                raw.extend_from_slice(logits);
            }
            if seq.grammar.is_some() {
                match masks.iter().find(|(j, _)| *j == i).map(|(_, m)| m) {
                    Some(Ok(mask)) => grammar::apply(mask, logits),
                    failed => {
                        let why = failed.map_or("the mask was not computed", |m| {
                            m.as_ref().err().map_or("", String::as_str)
                        });
                        done.push((i, Outcome::Error, grammar_failed(&seq.job, why)));
                        continue;
                    }
                }
            }
            let next = seq.sampler.sample(logits, &seq.tokens);
            if let Some(g) = seq.grammar.as_mut() {
                if let Err(why) = g.consume(next) {
                    done.push((i, Outcome::Error, grammar_failed(&seq.job, &why)));
                    continue;
                }
            }
            let lp = want_logprobs.map(|k| ctx.logprob(raw, next, k as usize, top));
            let step = match ctx.accept(seq, next, lp) {
                // A complete answer ends here, whatever `ignore_eos` says:
                // nothing but the end may follow it.
                Step::Running if seq.grammar.as_ref().is_some_and(Grammar::is_finished) => {
                    ctx.end(seq, StopReason::Eos)
                }
                step => step,
            };
            if let Step::Done(outcome, event) = step {
                done.push((i, outcome, event));
            }
        }
    }

    /// Give back the blocks and slots of the sequences in `done`, then
    /// send their terminal events.
    fn finish(&mut self, active: &mut Vec<Sequence>, done: &mut Vec<(usize, Outcome, JobEvent)>) {
        if done.is_empty() {
            return;
        }
        // Highest index first, so removals keep the others' indices; the
        // order of `active` (oldest first) is kept.
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        done.dedup_by_key(|d| d.0);
        for (i, outcome, event) in done.drain(..) {
            let seq = active.remove(i);
            self.ctx
                .shared
                .metrics
                .request_finished(outcome, seq.received.elapsed().as_secs_f64());
            let fed = (seq.fed > 0).then_some(seq.fed);
            let Sequence {
                job,
                _permit: permit,
                blocks,
                tokens,
                ..
            } = seq;
            self.pool.release(blocks, &tokens, fed);
            drop(permit);
            let _ = job.events.send(event);
        }
    }

    /// The pool's gauges.
    fn publish(&self, waiting: usize) {
        let m = &self.ctx.shared.metrics;
        m.kv_blocks_used.set(self.pool.used() as i64);
        m.kv_blocks_free
            .set((self.pool.total() - self.pool.used()) as i64);
        m.kv_blocks_cached.set(self.pool.cached() as i64);
        m.requests_waiting.set(waiting as i64);
    }
}

impl Context {
    fn mark_progress(&self) {
        let ms = u64::try_from(self.shared.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.shared.last_progress_ms.store(ms, Ordering::Release);
    }

    /// The log-probability of `next` under `raw`, the model's logits, with
    /// the `k` most likely tokens; `top` is scratch.
    fn logprob(&self, raw: &[f32], next: u32, k: usize, top: &mut Vec<(u32, f32)>) -> TokenLogprob {
        let logprob = sampler::log_softmax_top(raw, next, k, top);
        TokenLogprob {
            id: next,
            token: self.piece(next),
            logprob,
            top: top
                .iter()
                .map(|&(id, logprob)| TopLogprob {
                    id,
                    token: self.piece(id),
                    logprob,
                })
                .collect(),
        }
    }

    /// Token `id` decoded alone.
    fn piece(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Take the sampled token `next` of `seq`, with its log-probability
    /// when asked for: send it, or end the sequence.
    fn accept(&self, seq: &mut Sequence, next: u32, lp: Option<TokenLogprob>) -> Step {
        let now = Instant::now();
        if !seq.job.ignore_eos && self.eos.contains(&next) {
            return self.end(seq, StopReason::Eos);
        }
        seq.tokens.push(next);
        let index = seq.generated;
        seq.generated += 1;
        let m = &self.shared.metrics;
        m.generation_tokens.inc();
        match seq.last_token {
            None => m
                .time_to_first_token
                .observe((now - seq.received).as_secs_f64()),
            Some(prev) => m.inter_token_latency.observe((now - prev).as_secs_f64()),
        }
        seq.last_token = Some(now);
        #[cfg(feature = "fault-injection")]
        fault::after_token();
        let text = seq.detokenizer.push(&self.tokenizer, next);
        match seq.stop.push(&text) {
            StopCheck::Stopped(before) => {
                let _ = seq.job.events.send(JobEvent::Token {
                    t: before,
                    i: index,
                    lp,
                });
                self.end(seq, StopReason::StopSequence)
            }
            StopCheck::Continue(text) => {
                let _ = seq.job.events.send(JobEvent::Token {
                    t: text,
                    i: index,
                    lp,
                });
                if seq.generated >= seq.job.max_tokens || seq.tokens.len() >= self.context_length {
                    self.end(seq, StopReason::MaxTokens)
                } else {
                    Step::Running
                }
            }
        }
    }

    /// Release held text as a last token event and report the end.
    fn end(&self, seq: &mut Sequence, stop_reason: StopReason) -> Step {
        let mut tail = seq.detokenizer.finish(&self.tokenizer);
        if stop_reason != StopReason::StopSequence {
            match seq.stop.push(&tail) {
                StopCheck::Stopped(before) => tail = before,
                StopCheck::Continue(text) => tail = text + &seq.stop.finish(),
            }
            if !tail.is_empty() {
                let _ = seq.job.events.send(JobEvent::Token {
                    t: tail,
                    i: seq.generated.saturating_sub(1),
                    lp: None,
                });
            }
        }
        let decode_time_ms = seq.first_step.map_or(0, |t| {
            u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
        });
        Step::Done(
            Outcome::Ok,
            JobEvent::End {
                tokens_in: seq.prompt_len as u32,
                tokens_out: seq.generated,
                tokens_cached: seq.cached as u32,
                decode_time_ms,
                stop_reason,
            },
        )
    }
}
