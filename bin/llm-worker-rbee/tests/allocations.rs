//! The decode loop allocates nothing: weights, KV cache and every scratch
//! buffer are made at load, so forward passes (prompt chunks and single
//! tokens, on every compute thread) and sampling run on memory that exists
//! already. A counting global allocator (this test binary's only) watches
//! every thread while the real default model runs.

#[path = "support/model.rs"]
mod support;

use std::alloc::System;

use candle_core::Device;
use llm_worker_rbee::engine::sampler::{Sampler, SamplingParams};
use llm_worker_rbee::model::llama::{BlockTables, Forward, Row};
use llm_worker_rbee::model::{load_gguf, LoadOptions};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use support::default_model;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn prompt_chunks_decode_steps_and_sampling_allocate_no_memory() {
    let mut model = load_gguf(
        &default_model(),
        &Device::Cpu,
        LoadOptions {
            context: 1024,
            threads: 2,
            ..LoadOptions::default()
        },
    )
    .expect("load");
    let vocab = model.vocab_size;
    let tables = BlockTables::contiguous(1, 8);
    let f = model.model.as_mut();
    let prompt: Vec<Row> = (0..512)
        .map(|pos| Row {
            token: (pos * 13 % 40_000) as u32 + 100,
            seq: 0,
            pos,
            logits: pos == 511,
        })
        .collect();
    let mut tokens: Vec<u32> = Vec::with_capacity(1024);
    tokens.extend(prompt.iter().map(|r| r.token));
    let mut logits = Vec::with_capacity(vocab);
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repetition_penalty: 1.1,
        seed: Some(7),
    });
    let mut step = |f: &mut dyn Forward, tokens: &mut Vec<u32>| {
        let pos = tokens.len() - 1;
        let row = [Row {
            token: tokens[pos],
            seq: 0,
            pos,
            logits: true,
        }];
        let out = f.forward(&row, &tables).expect("decode");
        logits.clear();
        logits.extend_from_slice(out.row(0));
        let next = sampler.sample(&mut logits, tokens);
        tokens.push(next);
    };
    // Warm-up: the first chunk and step (nothing is allocated here either,
    // but first use is not what this test is about).
    f.forward(&prompt[..256], &tables).expect("prefill");
    step(f, &mut tokens);
    tokens.truncate(512);

    let region = Region::new(GLOBAL);
    f.forward(&prompt[256..], &tables).expect("prefill");
    for _ in 0..64 {
        step(f, &mut tokens);
    }
    let change = region.change();
    assert_eq!(tokens.len(), 512 + 64);
    assert_eq!(
        (change.allocations, change.reallocations),
        (0, 0),
        "a prompt chunk and 64 decode steps allocated: {change:?}"
    );
}
