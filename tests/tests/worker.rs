//! `llm-worker-rbee` with the real default model (SmolLM2-135M-Instruct Q4_1)
//! as its clients see it: answers, streaming, sampling, limits, deadlines,
//! cancellation, slots, probes under load and shutdown. Every test starts
//! its own worker. The engine and the process: `worker_engine.rs`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rbee_system_tests::http::field_names;
use rbee_system_tests::worker::{
    assert_unavailable, client, complete, long_generation, metric, paris_chat, post, token_time,
    wait_until, worker, Sse,
};
use rbee_system_tests::DaemonSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[test]
fn a_chat_request_for_the_capital_of_france_answers_paris() {
    let w = worker(&[]);
    let response = post(&w, "/v1/chat/completions", paris_chat());
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().expect("JSON");
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(answer.contains("Paris"), "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
}

#[test]
fn openai_streaming_sends_chunks_then_usage_then_done() {
    let w = worker(&[]);
    let mut chat = paris_chat();
    chat["stream"] = json!(true);
    // Without stream_options.include_usage there is no usage chunk, as
    // with OpenAI (clients that read choices[0] of every chunk rely on it).
    let mut sse = Sse::new(post(&w, "/v1/chat/completions", chat.clone()));
    while let Some(chunk) = sse.next_event() {
        assert!(chunk["usage"].is_null(), "{chunk}");
        assert_eq!(
            chunk["choices"].as_array().map(Vec::len),
            Some(1),
            "{chunk}"
        );
    }
    chat["stream_options"] = json!({"include_usage": true});
    let mut sse = Sse::new(post(&w, "/v1/chat/completions", chat));
    let mut text = String::new();
    let mut saw_role = false;
    let mut usage = None;
    let mut finish = None;
    while let Some(chunk) = sse.next_event() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(choice) = chunk["choices"].get(0) {
            saw_role |= choice["delta"]["role"] == "assistant";
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                finish = Some(choice["finish_reason"].clone());
            }
        }
        if chunk["usage"].is_object() {
            usage = Some(chunk["usage"].clone());
        }
    }
    assert!(saw_role);
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(finish, Some(json!("stop")));
    assert!(
        usage.expect("a usage chunk")["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let completion = post(
        &w,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 3}),
    );
    let body: Value = completion.json().expect("JSON");
    assert_eq!(body["object"], "text_completion");
    assert!(
        body["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{body}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[test]
fn tokens_are_streamed_as_they_are_produced_not_replayed() {
    let w = worker(&[]);
    let before = metric(&w, "rbee_worker_generation_tokens_total");
    let mut sse = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"prompt": "Write a long story about a dragon.", "max_tokens": 100, "temperature": 0, "ignore_eos": true}),
    ));
    let started = sse.next_event().expect("started event");
    assert_eq!(started["type"], "started");
    assert!(started["request_id"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    let first = sse.next_event().expect("first token");
    assert_eq!(first["type"], "token");
    assert_eq!(first["i"], 0);
    let generated = metric(&w, "rbee_worker_generation_tokens_total") - before;
    assert!(
        generated < 10.0,
        "{generated} tokens generated when the first arrived: replayed, not streamed"
    );
    let rest = sse.rest();
    let end = rest.last().expect("end event");
    assert_eq!(end["type"], "end", "{end}");
    assert_eq!(end["tokens_out"], 100);
    assert_eq!(end["stop_reason"], "max_tokens");
    let indexes: Vec<u64> = rest
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["i"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes.first(), Some(&1));
    assert!(indexes.windows(2).all(|p| p[1] >= p[0]), "indexes in order");
}

#[test]
fn greedy_runs_are_identical_and_seeded_runs_reproducible() {
    let w = worker(&[]);
    let greedy =
        json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 24, "stream": false});
    assert_eq!(
        complete(&w, greedy.clone())["text"],
        complete(&w, greedy)["text"]
    );
    let seeded = |seed: u64| json!({"prompt": "Once upon a time", "temperature": 1.0, "seed": seed, "max_tokens": 24, "stream": false});
    let a = complete(&w, seeded(42))["text"].clone();
    assert_eq!(a, complete(&w, seeded(42))["text"]);
    let others: Vec<Value> = (43..46)
        .map(|s| complete(&w, seeded(s))["text"].clone())
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds all gave {a}"
    );
}

#[test]
fn stop_sequences_and_max_tokens_end_generation() {
    let w = worker(&[]);
    let stopped = complete(
        &w,
        json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 20, "stop": ["."], "stream": false}),
    );
    assert_eq!(stopped["stop_reason"], "stop_sequence", "{stopped}");
    assert_eq!(stopped["text"], " Paris");
    let limited = complete(
        &w,
        json!({"prompt": "Count: one, two,", "temperature": 0, "max_tokens": 5, "stream": false}),
    );
    assert_eq!(limited["stop_reason"], "max_tokens");
    assert_eq!(limited["tokens_out"], 5);
}

#[test]
fn invalid_requests_list_every_bad_field_and_long_prompts_name_the_limit() {
    let w = worker(&[]);
    let response = post(
        &w,
        "/v1/inference",
        json!({"prompt": "", "max_tokens": 0, "temperature": 9, "top_p": 2, "stop": ["a","b","c","d","e"]}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(body["error"]["code"], "INVALID_REQUEST");
    assert_eq!(
        field_names(&body),
        ["prompt", "max_tokens", "temperature", "top_p", "stop"]
    );

    let response = post(
        &w,
        "/v1/inference",
        json!({"prompt": "x", "max_tokens": "many"}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json::<Value>().unwrap()["error"]["code"],
        "INVALID_JSON"
    );

    let long = "hello ".repeat(5000);
    let response = post(&w, "/v1/inference", json!({"prompt": long}));
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(body["error"]["code"], "PROMPT_TOO_LONG");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("4096"),
        "{body}"
    );

    let response = post(
        &w,
        "/v1/chat/completions",
        json!({"messages": [{"role": "wizard", "content": "hi"}], "temperature": -1, "max_completion_tokens": 0, "stream": "yes"}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(
        field_names(&body),
        [
            "messages[0].role",
            "stream",
            "max_completion_tokens",
            "temperature"
        ],
        "{body}"
    );
    let response = post(
        &w,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = post(
        &w,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21, "tool_choice": "required"}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(
        field_names(&body),
        ["tool_choice", "top_logprobs"],
        "{body}"
    );
}

#[test]
fn an_expired_deadline_is_refused_without_work_and_a_short_one_stops_generation() {
    let w = worker(&[]);
    let before = metric(&w, "rbee_worker_prompt_tokens_total");
    let response = client()
        .post(w.url("/v1/inference"))
        .header("x-deadline", "1700000000000")
        .json(&json!({"prompt": "hi"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        metric(&w, "rbee_worker_prompt_tokens_total"),
        before,
        "no work was done"
    );

    let response = client()
        .post(w.url("/v1/inference"))
        .header("x-timeout-ms", "1500")
        .json(&json!({"prompt": "Write a long story about a dragon.", "max_tokens": 2000, "temperature": 0, "ignore_eos": true}))
        .send()
        .unwrap();
    let mut sse = Sse::new(response);
    let mut stamps = Vec::new();
    let mut last = Value::Null;
    while let Some(event) = sse.next_event() {
        if event["type"] == "token" {
            stamps.push(Instant::now());
        }
        last = event;
    }
    assert_eq!(last["type"], "error", "{last}");
    assert_eq!(last["code"], "DEADLINE_EXCEEDED");
    assert!(
        stamps.len() >= 2,
        "generation ran before the deadline: {} tokens",
        stamps.len()
    );
    let step = (stamps[stamps.len() - 1] - stamps[0]) / (stamps.len() as u32 - 1);
    wait_until("slot freed", step * 2 + Duration::from_millis(300), || {
        metric(&w, "rbee_worker_requests_running") == 0.0
    });
    assert_eq!(
        metric(
            &w,
            "rbee_worker_requests_total{outcome=\"deadline_exceeded\"}"
        ),
        1.0
    );
}

#[test]
fn a_client_that_disconnects_frees_its_slot_within_two_token_times() {
    let w = worker(&[]);
    let mut sse = long_generation(&w);
    let step = token_time(&mut sse, 4);
    assert_eq!(metric(&w, "rbee_worker_requests_running"), 1.0);
    drop(sse);
    // Two token steps, plus the time to notice the closed socket.
    wait_until(
        "slot freed after disconnect",
        step * 2 + Duration::from_millis(300),
        || metric(&w, "rbee_worker_requests_running") == 0.0,
    );
    assert_eq!(
        metric(&w, "rbee_worker_requests_total{outcome=\"cancelled\"}"),
        1.0
    );
}

#[test]
fn delete_cancels_a_running_job_and_is_idempotent() {
    let w = worker(&[]);
    let mut sse = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"job_id": "job-to-cancel", "prompt": "Write a long story.", "max_tokens": 2000, "ignore_eos": true}),
    ));
    assert_eq!(
        sse.next_event().expect("started")["job_id"],
        "job-to-cancel"
    );
    sse.next_event().expect("a token");
    for _ in 0..2 {
        let response = client()
            .delete(w.url("/v1/inference/job-to-cancel"))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let last = sse.rest().pop().expect("final event");
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], "CANCELLED");
    wait_until("slot freed", Duration::from_millis(500), || {
        metric(&w, "rbee_worker_requests_running") == 0.0
    });
    let unknown = client()
        .delete(w.url("/v1/inference/never-existed"))
        .send()
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NO_CONTENT);
}

#[test]
fn a_busy_worker_answers_503_all_slots_busy_and_probes_stay_fast() {
    let w = worker(&["--slots", "1"]);
    let mut sse = long_generation(&w);
    sse.next_event().expect("a token");
    let busy = post(
        &w,
        "/v1/inference",
        json!({"prompt": "hi", "stream": false}),
    );
    assert_unavailable(busy, "ALL_SLOTS_BUSY");

    let ready: Value = client()
        .get(w.url("/v1/ready"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ready["state"], "busy");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let live = client().get(w.url("/health/live")).send().unwrap();
        assert_eq!(live.status(), StatusCode::OK);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a probe took {slowest:?} during generation"
    );
    drop(sse);
}

#[test]
fn sigterm_lets_the_running_generation_finish_then_exits_zero() {
    let mut w = worker(&[]);
    let mut sse = Sse::new(post(
        &w,
        "/v1/inference",
        json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}),
    ));
    sse.next_event().expect("started");
    sse.next_event().expect("a token");
    w.signal(Signal::SIGTERM);
    let last = sse.rest().pop().expect("final event");
    assert_eq!(last["type"], "end", "{last}");
    assert_eq!(last["tokens_out"], 30);
    let status = w.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_model_that_cannot_be_loaded_exits_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-a-model.gguf");
    std::fs::write(&bogus, b"definitely not gguf").unwrap();
    let out = DaemonSpec::new("llm-worker-rbee")
        .model(bogus.to_str().unwrap())
        .run_to_exit(Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("llm-worker-rbee: error: cannot load model"),
        "{stderr}"
    );
}

#[test]
fn a_full_worker_refuses_before_tokenizing_and_an_overlong_prompt_never_reaches_the_tokenizer() {
    let w = DaemonSpec::new("llm-worker-rbee")
        .args(["--slots", "1", "--ctx", "256"])
        .env("RUST_LOG", "info,llm_worker_rbee::http=debug")
        .spawn();
    w.wait_ready(Duration::from_secs(60));
    let ask = |request_id: &str, path: &str, body: Value| {
        client()
            .post(w.url(path))
            .header("x-request-id", request_id)
            .json(&body)
            .send()
            .expect("the worker answers")
    };
    let tokenized = |request_id: &str| {
        w.logs()
            .iter()
            .any(|l| l.contains("prompt tokenized") && l.contains(request_id))
    };
    // Longer in bytes than any prompt that could fit: refused by its length.
    let response = ask(
        "bytes-1",
        "/v1/inference",
        json!({"prompt": "a".repeat(1_000_000)}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(body["error"]["code"], "PROMPT_TOO_LONG", "{body}");
    let details = &body["error"]["details"];
    assert_eq!(details["prompt_bytes"], 1_000_000, "{body}");
    let max = details["max_prompt_bytes"]
        .as_u64()
        .expect("the byte limit");
    assert!(max < 1_000_000, "{body}");
    assert!(
        !tokenized("bytes-1"),
        "an overlong prompt reached the tokenizer"
    );

    // Under the byte limit, over the context: the tokenizer decides.
    let long = "hello ".repeat(usize::try_from(max).expect("usize") / 6);
    let body: Value = ask("tokens-1", "/v1/inference", json!({"prompt": long}))
        .json()
        .expect("JSON");
    assert_eq!(body["error"]["code"], "PROMPT_TOO_LONG", "{body}");
    assert!(body["error"]["details"]["prompt_tokens"].as_u64() > Some(256));
    assert!(w.wait_for_log("tokens-1", Duration::from_secs(5)));
    assert!(tokenized("tokens-1"), "the debug line this test relies on");

    // A full worker turns the same prompt away without tokenizing it, and
    // a chat without rendering it.
    let mut sse = long_generation(&w);
    sse.next_event().expect("a token");
    assert_unavailable(
        ask("busy-1", "/v1/inference", json!({"prompt": long})),
        "ALL_SLOTS_BUSY",
    );
    assert_unavailable(
        ask(
            "busy-2",
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": long}]}),
        ),
        "ALL_SLOTS_BUSY",
    );
    assert!(!tokenized("busy-1") && !tokenized("busy-2"));
    drop(sse);
}

#[test]
fn response_format_constrains_native_and_openai_answers_and_names_what_it_cannot_enforce() {
    let w = worker(&[]);
    // A Lark grammar on the native route, sampled at temperature 1: the
    // answer is a phone number every time, and ends there.
    for seed in 0..3 {
        let body = complete(
            &w,
            json!({"prompt": "Call me at", "stream": false, "temperature": 1.0, "seed": seed,
                   "max_tokens": 30, "ignore_eos": true,
                   "response_format": {"type": "lark", "grammar": "start: /[0-9]{3}-[0-9]{4}/"}}),
        );
        let text = body["text"].as_str().expect("text");
        let digits: Vec<bool> = text.bytes().map(|b| b.is_ascii_digit()).collect();
        assert_eq!(text.len(), 8, "{body}");
        assert_eq!(text.as_bytes()[3], b'-', "{body}");
        assert_eq!(digits.iter().filter(|d| **d).count(), 7, "{body}");
        assert_eq!(body["stop_reason"], "eos", "{body}");
    }
    // json_object on the worker's own OpenAI route.
    let response = post(
        &w,
        "/v1/completions",
        json!({"prompt": "{", "max_tokens": 80, "temperature": 0.7, "seed": 3,
               "response_format": {"type": "json_object"}}),
    );
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().expect("JSON");
    let text = body["choices"][0]["text"].as_str().expect("text");
    if body["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(v.is_object(), "{body}");
    } else {
        assert!(text.starts_with('{'), "{body}");
    }
    // What cannot be enforced is refused by name, in the contract's shape.
    let response = post(
        &w,
        "/v1/inference",
        json!({"prompt": "x", "response_format": {"type": "json_schema",
               "schema": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}),
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().expect("JSON");
    assert_eq!(body["error"]["code"], "INVALID_REQUEST", "{body}");
    assert_eq!(field_names(&body), ["response_format"], "{body}");
    let message = body["error"]["details"]["fields"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("if") && message.contains("then"), "{body}");
}
