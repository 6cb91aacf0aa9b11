//! The engine on the real default model, outside the daemon: jobs in,
//! events out.

use std::time::{Duration, Instant};

use candle_core::Device;
use llm_worker_rbee::engine::metrics::WorkerMetrics;
use llm_worker_rbee::engine::sampler::SamplingParams;
use llm_worker_rbee::engine::{Engine, Job, JobEvent};
use llm_worker_rbee::model::grammar::{Grammar, Grammars};
use llm_worker_rbee::model::{load_gguf, LoadOptions, LoadedModel};
use rbee_api::inference::{StopReason, TokenLogprob};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::support::default_model;

pub fn load() -> LoadedModel {
    load_gguf(&default_model(), &Device::Cpu, LoadOptions::default()).expect("load the model")
}

/// A running engine with `slots` slots, and what feeds it.
pub struct Running {
    pub engine: Engine,
    pub tokenizer: tokenizers::Tokenizer,
    pub grammars: Grammars,
}

pub fn start(slots: usize) -> Running {
    let loaded = load();
    let grammars = Grammars::new(&loaded.tokenizer, &loaded.eos_token_ids, loaded.vocab_size)
        .expect("the default model's tokenizer takes constraints");
    let tokenizer = loaded.tokenizer.clone();
    let engine = Engine::start(
        loaded.model,
        loaded.tokenizer,
        loaded.eos_token_ids,
        WorkerMetrics::unregistered(),
        slots,
        |why| panic!("{why}"),
    )
    .expect("engine");
    Running {
        engine,
        tokenizer,
        grammars,
    }
}

/// What one job asks for.
pub struct Ask<'a> {
    pub prompt: &'a str,
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    pub logprobs: Option<u32>,
    pub grammar: Option<Grammar>,
}

/// Sampling at `temperature` with `seed` and nothing else.
pub fn sampling(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        seed: Some(seed),
    }
}

/// How a job went.
#[derive(Debug)]
pub struct Outcome {
    pub prompt: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub tokens_out: u32,
    pub stop_reason: StopReason,
}

impl Running {
    /// Submit every job at once (so they share steps), then wait for each.
    pub fn run(&self, asks: Vec<Ask<'_>>) -> Vec<Outcome> {
        let mut streams: Vec<(Vec<u32>, UnboundedReceiver<JobEvent>)> = Vec::new();
        for (n, ask) in asks.into_iter().enumerate() {
            let ids = self
                .tokenizer
                .encode(ask.prompt, false)
                .expect("tokenize")
                .get_ids()
                .to_vec();
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let job = Job {
                job_id: format!("j{n}"),
                prompt: ids.clone(),
                max_tokens: ask.max_tokens,
                sampling: ask.sampling,
                stop: Vec::new(),
                ignore_eos: ask.ignore_eos,
                logprobs: ask.logprobs,
                grammar: ask.grammar,
                request_id: "test".to_owned(),
                deadline: Some(Instant::now() + Duration::from_secs(300)),
                cancel: CancellationToken::new(),
                events: tx,
            };
            let permit = self.engine.try_reserve().expect("a free slot");
            self.engine.submit(job, permit).expect("submitted");
            streams.push((ids, rx));
        }
        streams
            .into_iter()
            .map(|(prompt, mut rx)| {
                let mut text = String::new();
                let mut logprobs = Vec::new();
                loop {
                    match rx.blocking_recv().expect("an event") {
                        JobEvent::Token { t, lp, .. } => {
                            text.push_str(&t);
                            logprobs.extend(lp);
                        }
                        JobEvent::Started { .. } => {}
                        JobEvent::End {
                            tokens_out,
                            stop_reason,
                            ..
                        } => {
                            return Outcome {
                                prompt,
                                text,
                                logprobs,
                                tokens_out,
                                stop_reason,
                            }
                        }
                        JobEvent::Error { code, message } => panic!("{code:?}: {message}"),
                    }
                }
            })
            .collect()
    }
}
