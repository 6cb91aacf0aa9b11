//! The log-probabilities the engine reports against a direct computation:
//! the same model's logits at every position of the generated text, fed
//! in one pass through the forward pass, and log-softmax written out in
//! f64.
//!
//! Two jobs run together (so their decode rows share each step) and sample
//! with temperature, top-k and a repetition penalty: what they report must
//! still be the model's own distribution, before any of those.

#[path = "support/model.rs"]
mod support;

use std::time::{Duration, Instant};

use candle_core::Device;
use llm_worker_rbee::engine::metrics::WorkerMetrics;
use llm_worker_rbee::engine::sampler::SamplingParams;
use llm_worker_rbee::engine::{Engine, Job, JobEvent};
use llm_worker_rbee::model::llama::{BlockTables, Row};
use llm_worker_rbee::model::{load_gguf, LoadOptions, LoadedModel};
use rbee_api::inference::TokenLogprob;
use support::default_model;
use tokio_util::sync::CancellationToken;

const TOP: u32 = 20;

fn load() -> LoadedModel {
    load_gguf(&default_model(), &Device::Cpu, LoadOptions::default()).expect("load the model")
}

/// The logits at every position of `ids`, in one pass.
fn all_logits(model: &mut LoadedModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let rows: Vec<Row> = ids
        .iter()
        .enumerate()
        .map(|(pos, &token)| Row {
            token,
            seq: 0,
            pos,
            logits: true,
        })
        .collect();
    let out = model
        .model
        .forward(&rows, &BlockTables::contiguous(1, 32))
        .expect("forward");
    (0..ids.len()).map(|i| out.row(i).to_vec()).collect()
}

/// Run `prompts` together with logprobs asked for; each one's prompt ids,
/// generated ids and reported log-probabilities.
fn generate(prompts: &[&str]) -> Vec<(Vec<u32>, Vec<TokenLogprob>)> {
    let loaded = load();
    let tokenizer = loaded.tokenizer.clone();
    let engine = Engine::start(
        loaded.model,
        loaded.tokenizer,
        loaded.eos_token_ids,
        WorkerMetrics::unregistered(),
        prompts.len(),
        |why| panic!("{why}"),
    )
    .expect("engine");
    let mut streams = Vec::new();
    for (n, prompt) in prompts.iter().enumerate() {
        let ids = tokenizer
            .encode(*prompt, false)
            .expect("tokenize")
            .get_ids()
            .to_vec();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            job_id: format!("j{n}"),
            prompt: ids.clone(),
            max_tokens: 24,
            sampling: SamplingParams {
                temperature: 0.9,
                top_k: 40,
                top_p: 1.0,
                min_p: 0.0,
                repetition_penalty: 1.5,
                seed: Some(n as u64 + 11),
            },
            stop: Vec::new(),
            ignore_eos: true,
            logprobs: Some(TOP),
            request_id: "test".to_owned(),
            deadline: Some(Instant::now() + Duration::from_secs(120)),
            cancel: CancellationToken::new(),
            events: tx,
        };
        let permit = engine.try_reserve().expect("a free slot");
        engine.submit(job, permit).expect("submitted");
        streams.push((ids, rx));
    }
    streams
        .into_iter()
        .map(|(ids, mut rx)| {
            let mut lps = Vec::new();
            loop {
                match rx.blocking_recv().expect("an event") {
                    JobEvent::Token { lp: Some(lp), .. } => lps.push(lp),
                    JobEvent::Token { lp: None, .. } | JobEvent::Started { .. } => {}
                    JobEvent::End { tokens_out, .. } => {
                        assert_eq!(tokens_out as usize, lps.len(), "one entry per token");
                        break;
                    }
                    JobEvent::Error { code, message } => panic!("{code:?}: {message}"),
                }
            }
            (ids, lps)
        })
        .collect()
}

/// log(softmax(logits)), in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .sum();
    logits
        .iter()
        .map(|&l| f64::from(l) - f64::from(max) - z.ln())
        .collect()
}

#[test]
fn reported_logprobs_are_the_models_distribution_before_sampling_settings() {
    let runs = generate(&[
        "The three primary colours are",
        "Write a short poem about the sea.",
    ]);
    let mut direct_model = load();
    let mut not_argmax = 0;
    let mut worst = 0.0f64;
    for (prompt, lps) in runs {
        assert_eq!(lps.len(), 24);
        let mut ids = prompt.clone();
        ids.extend(lps.iter().map(|lp| lp.id));
        let logits = all_logits(&mut direct_model, &ids);
        for (j, lp) in lps.iter().enumerate() {
            // The logits at the position before token j predict it.
            let direct = log_softmax(&logits[prompt.len() - 1 + j]);
            worst = worst.max((f64::from(lp.logprob) - direct[lp.id as usize]).abs());
            let mut order: Vec<usize> = (0..direct.len()).collect();
            order.sort_by(|&a, &b| direct[b].total_cmp(&direct[a]));
            let top: Vec<u32> = lp.top.iter().map(|t| t.id).collect();
            let want: Vec<u32> = order[..TOP as usize].iter().map(|&i| i as u32).collect();
            assert_eq!(top, want, "token {j}");
            for t in &lp.top {
                worst = worst.max((f64::from(t.logprob) - direct[t.id as usize]).abs());
                assert_eq!(
                    t.token,
                    direct_model
                        .tokenizer
                        .decode(&[t.id], false)
                        .expect("decode")
                );
            }
            not_argmax += usize::from(lp.id != want[0]);
        }
    }
    eprintln!("largest difference from the direct computation: {worst:.2e}");
    assert!(worst < 1e-4, "{worst}");
    assert!(
        not_argmax > 0,
        "sampling at temperature 0.9 with a penalty picked the most likely token every time"
    );
}
