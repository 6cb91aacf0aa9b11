//! What the engine reports and enforces beyond text, on the real default
//! model.
//!
//! Log-probabilities, against a direct computation: the same model's logits
//! at every position of the generated text, fed in one pass through the
//! forward pass, and log-softmax written out in f64. Two jobs run together
//! (so their decode rows share each step) and sample with temperature,
//! top-k and a repetition penalty: what they report must still be the
//! model's own distribution, before any of those.
//!
//! Constrained output: answers sampled at temperature 1 (where the model
//! alone wanders off into prose) parse and match their schema every time;
//! a constrained sequence in a batch leaves the others' tokens exactly as
//! they are alone; a complete answer ends the sequence even when
//! `ignore_eos` asks for more; schema features llguidance does not enforce
//! are refused by name.

#[path = "support/engine.rs"]
mod engine;
#[path = "support/model.rs"]
mod support;

use engine::{load, sampling, Ask};
use llm_worker_rbee::engine::sampler::SamplingParams;
use llm_worker_rbee::model::llama::{BlockTables, Row};
use llm_worker_rbee::model::LoadedModel;
use rbee_api::inference::{Constraint, StopReason};
use serde_json::{json, Value};

const TOP: u32 = 20;

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
    let running = engine::start(2);
    let asks = [
        "The three primary colours are",
        "Write a short poem about the sea.",
    ]
    .iter()
    .enumerate()
    .map(|(n, prompt)| Ask {
        prompt,
        max_tokens: 24,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.5,
            seed: Some(n as u64 + 11),
        },
        ignore_eos: true,
        logprobs: Some(TOP),
        grammar: None,
    })
    .collect();
    let runs = running.run(asks);
    let mut direct_model = load();
    let mut not_argmax = 0;
    let mut worst = 0.0f64;
    for run in runs {
        let (prompt, lps) = (run.prompt, run.logprobs);
        assert_eq!(run.tokens_out, 24);
        assert_eq!(lps.len(), 24, "one entry per token");
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

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "pet": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,10}$"}]}
        },
        "required": ["name", "age", "colours", "pet"],
        "additionalProperties": false
    })
}

/// The checks of [`person_schema`], written out.
fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v.as_object().expect("an object");
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "colours", "name", "pet"], "{text}");
    let name = o["name"].as_str().expect("name is a string");
    assert!((1..=20).contains(&name.chars().count()), "{text}");
    assert!(o["age"].as_u64().is_some_and(|a| a <= 150), "{text}");
    let colours = o["colours"].as_array().expect("colours is an array");
    assert!(colours.len() <= 3, "{text}");
    for c in colours {
        assert!(
            ["red", "green", "blue"].contains(&c.as_str().unwrap_or("")),
            "{text}"
        );
    }
    match &o["pet"] {
        Value::Null => {}
        Value::String(p) => assert!(
            (1..=10).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_lowercase()),
            "{text}"
        ),
        other => panic!("pet is {other}: {text}"),
    }
}

#[test]
fn constrained_answers_match_their_schema_and_leave_the_batch_alone() {
    let running = engine::start(4);
    let schema = Constraint::JsonSchema {
        schema: person_schema(),
    };
    let free = |seed| Ask {
        prompt: "Once upon a time",
        max_tokens: 40,
        sampling: sampling(1.0, seed),
        ignore_eos: true,
        logprobs: None,
        grammar: None,
    };
    let alone = running.run(vec![free(5)]).remove(0);
    let mut asks = vec![free(5)];
    for seed in 0..2 {
        asks.push(Ask {
            prompt: "Describe a person as JSON.",
            max_tokens: 200,
            sampling: sampling(1.0, seed),
            // A complete answer must end the sequence anyway.
            ignore_eos: true,
            logprobs: None,
            grammar: Some(running.grammars.compile(&schema).expect("compiles")),
        });
    }
    asks.push(Ask {
        prompt: "Any JSON object:",
        max_tokens: 200,
        sampling: sampling(1.0, 9),
        ignore_eos: false,
        logprobs: None,
        grammar: Some(
            running
                .grammars
                .compile(&Constraint::JsonObject)
                .expect("compiles"),
        ),
    });
    let out = running.run(asks);
    assert_eq!(
        out[0].text, alone.text,
        "the unconstrained sequence samples the same tokens beside constrained ones"
    );
    for person in &out[1..3] {
        eprintln!("{} tokens: {}", person.tokens_out, person.text);
        check_person(&person.text);
        assert_eq!(person.stop_reason, StopReason::Eos);
        assert!(person.tokens_out < 200);
    }
    let object = &out[3];
    eprintln!("{} tokens: {}", object.tokens_out, object.text);
    if object.stop_reason == StopReason::Eos {
        let v: Value = serde_json::from_str(&object.text).expect("parses");
        assert!(v.is_object(), "{}", object.text);
    } else {
        assert!(object.text.starts_with('{'), "{}", object.text);
    }
}

#[test]
fn schema_features_that_cannot_be_enforced_are_named() {
    let loaded = load();
    let grammars = llm_worker_rbee::model::grammar::Grammars::new(
        &loaded.tokenizer,
        &loaded.eos_token_ids,
        loaded.vocab_size,
    )
    .expect("grammars");
    let refused = |schema: Value| {
        grammars
            .compile(&Constraint::JsonSchema { schema })
            .expect_err("refused")
            .to_string()
    };
    let e = refused(json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true}));
    assert!(e.contains("uniqueItems"), "{e}");
    // oneOf over schemas that can both match cannot be enforced (over
    // disjoint ones it is anyOf, and is).
    let e = refused(json!({"oneOf": [{"type": "integer"}, {"type": "number"}]}));
    assert!(e.contains("oneOf"), "{e}");
    assert!(grammars
        .compile(&Constraint::JsonSchema {
            schema: json!({"oneOf": [{"type": "integer"}, {"type": "string"}]})
        })
        .is_ok());
    let e = refused(json!({"type": "object", "not": {"required": ["a"]}}));
    assert!(e.contains("not"), "{e}");
    // Lark grammars too, with the line at fault.
    let e = grammars
        .compile(&Constraint::Lark {
            grammar: "start: undefined_rule".to_owned(),
        })
        .expect_err("refused")
        .to_string();
    assert!(e.contains("undefined_rule"), "{e}");
}
