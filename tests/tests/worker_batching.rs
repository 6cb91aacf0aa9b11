//! `llm-worker-rbee`'s continuous batching with the real default model: the
//! same tokens alone or inside a batch, one sequence's end leaving the
//! others untouched, a long prompt delaying the others by one chunk, prefix
//! reuse, and a KV cache pool that makes requests wait instead of growing.

use std::time::{Duration, Instant};

use rbee_system_tests::worker::{client, complete, metric, post, wait_until, worker, Sse};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Eight prompts of different lengths.
fn prompts() -> Vec<String> {
    let base = [
        "The history of the printing press",
        "A recipe for bread: first",
        "In 1969, the first people to walk on the moon",
        "Rust is a programming language that",
        "The three primary colours are",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "Photosynthesis is the process by which plants",
        "The best way to learn to play the piano is to practise every day and",
    ];
    base.iter()
        .enumerate()
        .map(|(i, p)| format!("{} {}", p, "and more ".repeat(i * 3)))
        .collect()
}

/// The request for prompt `p`: greedy, or sampled with a seed.
fn request(p: &str, seed: Option<u64>) -> Value {
    match seed {
        None => {
            json!({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "stream": false})
        }
        Some(s) => {
            json!({"prompt": p, "max_tokens": 24, "temperature": 0.8, "seed": s, "ignore_eos": true, "stream": false})
        }
    }
}

#[test]
fn the_same_request_gives_the_same_tokens_alone_or_in_a_batch_of_eight_joined_at_different_steps() {
    let w = worker(&[]);
    let prompts = prompts();
    let requests: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| request(p, (i % 2 == 1).then_some(7 + i as u64)))
        .collect();
    let steps_before = metric(&w, "rbee_worker_engine_steps_total");
    let tokens_before = metric(&w, "rbee_worker_generation_tokens_total");
    // All eight at once, each joining a few steps after the one before.
    let batched: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let w = &w;
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(40 * i as u64));
                    complete(w, r.clone())["text"]
                        .as_str()
                        .expect("text")
                        .to_owned()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    let steps = metric(&w, "rbee_worker_engine_steps_total") - steps_before;
    let generated = metric(&w, "rbee_worker_generation_tokens_total") - tokens_before;
    assert_eq!(generated, 8.0 * 24.0);
    assert!(
        steps < generated / 2.0,
        "{steps} steps for {generated} tokens: the sequences were not batched"
    );
    // Then each alone (its prompt now comes from the prefix cache, which
    // must not change a token either).
    for (i, r) in requests.iter().enumerate() {
        let alone = complete(&w, r.clone());
        assert_eq!(alone["text"], batched[i], "request {i}: {r}");
        assert!(alone["tokens_cached"].as_u64().unwrap_or(0) > 0, "{alone}");
    }
}

/// Tokens of a stream until its end event (or error): (texts, last event).
fn drain(mut sse: Sse) -> (Vec<String>, Value) {
    let mut texts = Vec::new();
    while let Some(e) = sse.next_event() {
        match e["type"].as_str() {
            Some("token") => texts.push(e["t"].as_str().unwrap_or_default().to_owned()),
            Some("end" | "error") => return (texts, e),
            _ => {}
        }
    }
    panic!("the stream ended without an end event");
}

#[test]
fn ending_one_sequence_leaves_the_others_untouched_and_a_long_prompt_delays_them_one_chunk() {
    let w = worker(&[]);
    let long_story = |p: &str| json!({"prompt": p, "max_tokens": 80, "temperature": 0, "ignore_eos": true, "stream": false});
    let a = long_story("The story of a lighthouse keeper:");
    let b = long_story("A letter to a friend about the weather:");
    let want_a = complete(&w, a.clone())["text"].clone();
    let want_b = complete(&w, b.clone())["text"].clone();

    // A prompt of about 1,000 tokens (four chunks), and the time one chunk
    // takes on this machine now: a 256-token prompt's first token.
    let long_prompt = "the quick brown fox jumps over the lazy dog ".repeat(100);
    let chunk = "one two three four five six seven eight ".repeat(28);
    let t = Instant::now();
    complete(
        &w,
        json!({"prompt": chunk, "max_tokens": 1, "stream": false}),
    );
    let chunk_time = t.elapsed();

    let started = |body: &Value, headers: &[(&str, &str)]| {
        let mut r = client().post(w.url("/v1/inference")).json(&{
            let mut b = body.clone();
            b["stream"] = json!(true);
            b
        });
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let mut sse = Sse::new(r.send().expect("send"));
        assert_eq!(sse.next_event().expect("started")["type"], "started");
        sse
    };
    let mut sa = started(&a, &[]);
    let sb = started(&b, &[]);
    // One to cancel by disconnecting, one to run out its deadline.
    let mut cancelled = started(&long_story("A list of fruits:"), &[]);
    let expiring = started(
        &json!({"prompt": "Count to a thousand:", "max_tokens": 2000, "ignore_eos": true, "stream": false}),
        &[("X-Timeout-Ms", "1500")],
    );
    cancelled.next_event().expect("a token");
    drop(cancelled);

    // `a`'s inter-token gaps while the long prompt is prefilled.
    let mut texts_a = Vec::new();
    let mut gaps = Vec::new();
    let mut last = Instant::now();
    let (long, prefill) = std::thread::scope(|s| {
        let long = s.spawn(|| {
            let t = Instant::now();
            let r = complete(
                &w,
                json!({"prompt": long_prompt, "max_tokens": 1, "stream": false}),
            );
            (r, t.elapsed())
        });
        while let Some(e) = sa.next_event() {
            let now = Instant::now();
            if e["type"] == "token" {
                texts_a.push(e["t"].as_str().unwrap_or_default().to_owned());
                gaps.push(now - last);
            } else {
                assert_eq!(e["type"], "end", "{e}");
                break;
            }
            last = now;
        }
        long.join().expect("join")
    });
    assert!(
        long["tokens_in"].as_u64().expect("tokens_in") > 900,
        "{long}"
    );
    let (texts_b, end_b) = drain(sb);
    let (_, expired) = drain(expiring);
    assert_eq!(expired["type"], "error");
    assert_eq!(expired["code"], "DEADLINE_EXCEEDED");
    assert_eq!(end_b["type"], "end");
    assert_eq!(texts_a.concat(), want_a.as_str().expect("text"));
    assert_eq!(texts_b.concat(), want_b.as_str().expect("text"));
    // Without chunks the long prompt would hold `a` for its whole prefill,
    // about four chunks; with them, one chunk and one decode row at most.
    // The bound is the long prompt's own prefill, timed in the same minutes:
    // the other tests of this file run at once and share the cores, so a
    // chunk timed alone beforehand can be half what it takes here.
    let worst = gaps.iter().skip(1).max().copied().unwrap_or_default();
    assert!(
        worst < prefill / 2,
        "the longest gap in `a` was {worst:?}; the long prompt's prefill took \
         {prefill:?} (one chunk alone: {chunk_time:?})"
    );
    wait_until("all slots free", Duration::from_secs(10), || {
        metric(&w, "rbee_worker_requests_running") == 0.0
    });
    assert_eq!(metric(&w, "rbee_worker_kv_blocks_used"), 0.0);
}

/// A system message of about 400 tokens.
fn long_system() -> String {
    let rules = [
        "Answer in plain English.",
        "Be brief and precise.",
        "Never invent facts you are unsure of.",
        "Prefer metric units.",
        "Quote your sources when you have them.",
    ];
    let mut s = String::from("You are a careful assistant for a public library. ");
    for i in 0..36 {
        s.push_str(&format!("Rule {}: {} ", i + 1, rules[i % rules.len()]));
    }
    s
}

fn chat(system: &str, question: &str) -> Value {
    json!({
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question}
        ],
        "temperature": 0,
        "max_tokens": 16
    })
}

#[test]
fn a_second_request_with_the_same_system_prompt_skips_its_prefill() {
    let w = worker(&[]);
    let system = long_system();
    let first = post(
        &w,
        "/v1/chat/completions",
        chat(&system, "What is a library card?"),
    );
    assert_eq!(first.status(), StatusCode::OK);
    let first: Value = first.json().expect("JSON");
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(prompt_tokens >= 400, "{first}");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached_before = metric(&w, "rbee_worker_prompt_tokens_cached_total");
    let hits_before = metric(&w, "rbee_worker_prefix_cache_hits_total");
    let rows_before = metric(&w, "rbee_worker_engine_step_rows_total");

    let question = chat(&system, "How long can I keep a book?");
    let second: Value = post(&w, "/v1/chat/completions", question.clone())
        .json()
        .expect("JSON");
    let prompt2 = second["usage"]["prompt_tokens"].as_u64().expect("usage");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached tokens");
    assert!(cached >= 380, "{second}");
    assert!(cached < prompt2, "the last prompt token is always computed");
    assert_eq!(
        metric(&w, "rbee_worker_prompt_tokens_cached_total") - cached_before,
        cached as f64
    );
    assert_eq!(
        metric(&w, "rbee_worker_prefix_cache_hits_total") - hits_before,
        1.0
    );
    // Only the new prompt tokens and the generated ones went through the model.
    // (The last generated token is fed only when it is followed by an
    // end-of-sequence token.)
    let completion = second["usage"]["completion_tokens"]
        .as_u64()
        .expect("usage");
    let fed_generated = if second["choices"][0]["finish_reason"] == "length" {
        completion - 1
    } else {
        completion
    };
    let rows = metric(&w, "rbee_worker_engine_step_rows_total") - rows_before;
    assert_eq!(rows, (prompt2 - cached + fed_generated) as f64, "{second}");

    // The answer is the one a worker with an empty cache gives.
    let fresh = worker(&[]);
    let cold: Value = post(&fresh, "/v1/chat/completions", question)
        .json()
        .expect("JSON");
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        second["choices"][0]["message"]["content"],
        cold["choices"][0]["message"]["content"]
    );
}

#[test]
fn a_full_kv_pool_makes_requests_wait_and_never_grows() {
    // Four blocks of 128 positions; each request may need two (a short
    // prompt and 200 tokens), so two run and the others wait.
    let w = worker(&["--kv-tokens", "512", "--ctx", "512", "--slots", "4"]);
    assert_eq!(metric(&w, "rbee_worker_kv_blocks_total"), 4.0);
    let mut peak_waiting = 0.0f64;
    let answers = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let w = &w;
                s.spawn(move || {
                    complete(
                        w,
                        json!({"prompt": format!("Story number {i}:"), "max_tokens": 200, "ignore_eos": true, "stream": false}),
                    )
                })
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            let used = metric(&w, "rbee_worker_kv_blocks_used");
            assert!(used <= 4.0, "{used} blocks in use");
            peak_waiting = peak_waiting.max(metric(&w, "rbee_worker_requests_waiting"));
            std::thread::sleep(Duration::from_millis(20));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect::<Vec<_>>()
    });
    assert!(peak_waiting >= 1.0, "no request waited for blocks");
    for a in &answers {
        assert_eq!(a["tokens_out"], 200, "{a}");
    }
    // Capacity as the readiness probe reports it.
    let ready: Value = client()
        .get(w.url("/health/ready"))
        .send()
        .and_then(reqwest::blocking::Response::json)
        .expect("ready");
    assert_eq!(ready["capacity"]["slots_total"], 4, "{ready}");
    assert_eq!(ready["capacity"]["kv_blocks_total"], 4, "{ready}");
    assert_eq!(ready["capacity"]["kv_blocks_used"], 0, "{ready}");
    // A prompt longer than the context is refused, not queued.
    let too_long = post(
        &w,
        "/v1/inference",
        json!({"prompt": "word ".repeat(600), "max_tokens": 4}),
    );
    assert_eq!(too_long.status(), StatusCode::BAD_REQUEST);
}
