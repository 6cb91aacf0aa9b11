//! The inference engine: one thread that owns the model and runs every
//! active sequence a step at a time, so the async runtime never waits on
//! the model and probes answer while a generation runs.
//!
//! Each sequence holds a slot: one of the model's KV cache regions.
//! [`Engine::try_reserve`] hands out slots without blocking; when all are
//! taken the HTTP side answers 503 `ALL_SLOTS_BUSY`. A step is one forward
//! pass: a chunk of up to [`PREFILL_CHUNK`] prompt tokens, or one generated
//! token. Between steps the engine checks each sequence's cancellation and
//! deadline, so a disconnect, a `DELETE` or an expired deadline stops it
//! within one step, and a long prompt shows progress chunk by chunk.

pub mod detokenizer;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod metrics;
pub mod sampler;
pub mod stop;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rbee_api::inference::{StopReason, StreamEvent};
use rbee_api::{ErrorCode, Outcome};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use self::detokenizer::Detokenizer;
use self::metrics::WorkerMetrics;
use self::sampler::{Sampler, SamplingParams};
use self::stop::{StopCheck, StopMatcher};
use crate::model::llama::{Forward, Row};
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
    /// Start the engine thread over `model`, with as many slots as the
    /// model has sequences.
    pub fn start(
        model: Box<dyn Forward>,
        tokenizer: tokenizers::Tokenizer,
        eos: Vec<u32>,
        metrics: WorkerMetrics,
    ) -> std::io::Result<Self> {
        let limits = model.limits();
        let slots = limits.sequences.max(1);
        let shared = Arc::new(Shared {
            slots,
            active: AtomicUsize::new(0),
            last_progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
            abort: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::sync_channel(slots);
        let worker = Worker {
            model,
            free: (0..slots).rev().collect(),
            rows: Vec::with_capacity(PREFILL_CHUNK),
            logits: Vec::with_capacity(limits.vocab),
            tokenizer,
            eos,
            context_length: limits.context,
            shared: Arc::clone(&shared),
        };
        std::thread::Builder::new()
            .name("engine".to_owned())
            .spawn(move || worker.run(rx))?;
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

    /// How long the engine has had work without finishing a step, if it has work.
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.active() == 0 {
            return None;
        }
        let last = Duration::from_millis(self.shared.last_progress_ms.load(Ordering::Acquire));
        Some(self.shared.epoch.elapsed().saturating_sub(last))
    }
}

struct Worker {
    model: Box<dyn Forward>,
    /// Sequence slots (KV regions) not in use.
    free: Vec<usize>,
    /// The batch of the current step, reused.
    rows: Vec<Row>,
    /// The logits being sampled, reused.
    logits: Vec<f32>,
    tokenizer: tokenizers::Tokenizer,
    eos: Vec<u32>,
    context_length: usize,
    shared: Arc<Shared>,
}

struct Sequence {
    job: Job,
    _permit: SlotPermit,
    /// The model's KV region this sequence uses.
    slot: usize,
    sampler: Sampler,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V rows are in the cache.
    fed: usize,
    generated: u32,
    admitted: Instant,
    first_step: Option<Instant>,
    last_token: Option<Instant>,
}

enum Step {
    Running,
    /// The sequence is over; its terminal event (`End` or `Error`) is sent
    /// only after the slot is back in the pool, so a client that sends its
    /// next request as soon as this one ends finds the slot free.
    Done(Outcome, JobEvent),
}

impl Worker {
    fn run(mut self, rx: Receiver<(Job, SlotPermit)>) {
        let mut active: Vec<Sequence> = Vec::new();
        loop {
            if active.is_empty() {
                match rx.recv() {
                    Ok((job, permit)) => self.admit(&mut active, job, permit),
                    Err(_) => return,
                }
            }
            while let Ok((job, permit)) = rx.try_recv() {
                self.admit(&mut active, job, permit);
            }
            let mut i = 0;
            while i < active.len() {
                let outcome = self.step(&mut active[i]);
                self.mark_progress();
                match outcome {
                    Step::Running => i += 1,
                    Step::Done(outcome, last) => {
                        let seq = active.swap_remove(i);
                        self.finish_metrics(&seq, outcome);
                        let Sequence {
                            job,
                            _permit: permit,
                            slot,
                            ..
                        } = seq;
                        // The next sequence overwrites the region from
                        // position 0 and never reads past what it wrote.
                        self.free.push(slot);
                        drop(permit);
                        let _ = job.events.send(last);
                    }
                }
            }
        }
    }

    fn mark_progress(&self) {
        let ms = u64::try_from(self.shared.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.shared.last_progress_ms.store(ms, Ordering::Release);
    }

    fn admit(&mut self, active: &mut Vec<Sequence>, job: Job, permit: SlotPermit) {
        let Some(slot) = self.free.pop() else {
            // Cannot happen: permits are bounded by the pool size.
            let _ = job.events.send(JobEvent::Error {
                code: ErrorCode::AllSlotsBusy,
                message: "no free slot".to_owned(),
            });
            return;
        };
        self.mark_progress();
        self.shared
            .metrics
            .prompt_tokens
            .inc_by(job.prompt.len() as u64);
        let tokens = job.prompt.clone();
        active.push(Sequence {
            sampler: Sampler::new(job.sampling),
            stop: StopMatcher::new(&job.stop),
            prompt_len: tokens.len(),
            tokens,
            job,
            _permit: permit,
            slot,
            fed: 0,
            detokenizer: Detokenizer::new(),
            generated: 0,
            admitted: Instant::now(),
            first_step: None,
            last_token: None,
        });
    }

    fn step(&mut self, seq: &mut Sequence) -> Step {
        if seq.job.cancel.is_cancelled() || seq.job.events.is_closed() {
            return Step::Done(
                Outcome::Cancelled,
                JobEvent::Error {
                    code: ErrorCode::Cancelled,
                    message: "the request was cancelled".to_owned(),
                },
            );
        }
        if self.shared.abort.load(Ordering::Acquire) {
            return Step::Done(
                Outcome::Cancelled,
                JobEvent::Error {
                    code: ErrorCode::ShuttingDown,
                    message: "the worker is shutting down and its drain time is up".to_owned(),
                },
            );
        }
        if seq.job.deadline.is_some_and(|d| Instant::now() >= d) {
            return Step::Done(
                Outcome::DeadlineExceeded,
                JobEvent::Error {
                    code: ErrorCode::DeadlineExceeded,
                    message: format!(
                        "the deadline passed after {} generated tokens",
                        seq.generated
                    ),
                },
            );
        }
        let next = match self.forward_and_sample(seq) {
            // A prompt chunk that does not reach the prompt's end.
            Ok(None) => return Step::Running,
            Ok(Some(next)) => next,
            Err(e) => {
                tracing::error!(
                    job_id = %seq.job.job_id,
                    request_id = %seq.job.request_id,
                    error = %e,
                    "decode step failed"
                );
                return Step::Done(
                    Outcome::Error,
                    JobEvent::Error {
                        code: ErrorCode::Internal,
                        message: "the decode step failed; see the worker's log".to_owned(),
                    },
                );
            }
        };
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
                .observe((now - seq.admitted).as_secs_f64()),
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
                });
                self.end(seq, StopReason::StopSequence)
            }
            StopCheck::Continue(text) => {
                let _ = seq.job.events.send(JobEvent::Token { t: text, i: index });
                if seq.generated >= seq.job.max_tokens || seq.tokens.len() >= self.context_length {
                    self.end(seq, StopReason::MaxTokens)
                } else {
                    Step::Running
                }
            }
        }
    }

    /// One forward pass for `seq`: the next chunk of its prompt, or its
    /// last token. Returns the sampled token once the prompt is in.
    fn forward_and_sample(
        &mut self,
        seq: &mut Sequence,
    ) -> Result<Option<u32>, crate::model::llama::ForwardError> {
        if seq.first_step.is_none() {
            seq.first_step = Some(Instant::now());
        }
        let len = seq.tokens.len();
        let start = seq.fed.min(len - 1);
        let end = (start + PREFILL_CHUNK).min(len);
        self.rows.clear();
        self.rows.extend((start..end).map(|pos| Row {
            token: seq.tokens[pos],
            seq: seq.slot,
            pos,
            logits: pos + 1 == len,
        }));
        let logits = self.model.forward(&self.rows)?;
        seq.fed = end;
        if end < len {
            return Ok(None);
        }
        self.logits.clear();
        self.logits.extend_from_slice(logits.row(0));
        Ok(Some(seq.sampler.sample(&mut self.logits, &seq.tokens)))
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
                decode_time_ms,
                stop_reason,
            },
        )
    }

    fn finish_metrics(&self, seq: &Sequence, outcome: Outcome) {
        let m = &self.shared.metrics;
        m.request_finished(outcome, seq.admitted.elapsed().as_secs_f64());
    }
}
