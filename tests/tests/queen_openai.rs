//! The queen's OpenAI-compatible API driven by the official `openai` Python
//! client: answers, streams, log-probabilities and structured output on the
//! default model; tool calls on the default model rewritten with a
//! template that shows tools; embeddings from the default embedding model,
//! checked against sentence-transformers' vectors.

use std::time::Duration;

use nix::sys::signal::Signal;
use rbee_system_tests::queen::{
    default_ref, hive_with_model, hive_with_models, openai_check, queen_spec, ready_queen,
};
use rbee_system_tests::{DaemonSpec, TEST_TOKEN};
use serde_json::{json, Value};

#[test]
fn the_official_openai_python_client_parses_the_queens_answers() {
    let hive = hive_with_model(DaemonSpec::new("rbee-hive").with_token(), Some(TEST_TOKEN));
    let audit = tempfile::tempdir().expect("audit dir");
    let queen = ready_queen(
        &queen_spec(&[&hive])
            .with_token()
            .env("LLORCH_AUDIT_MODE", "local")
            .env("LLORCH_AUDIT_DIR", &audit.path().display().to_string()),
        Some(TEST_TOKEN),
    );
    let model = default_ref();
    let r = openai_check("openai_client_check.py", &queen, &[&model]);
    assert_eq!(r["models"], json!([model]));
    assert_eq!(r["chat"]["object"], "chat.completion");
    assert_eq!(r["chat"]["role"], "assistant");
    assert_eq!(r["chat"]["completion_tokens"], 8);
    assert!(
        !r["chat"]["content"].as_str().unwrap_or("").is_empty(),
        "{r}"
    );
    assert_eq!(r["chat_stream"]["finish_reason"], "length");
    assert_eq!(r["chat_stream"]["completion_tokens"], 8);
    assert!(r["chat_stream"]["chunks"].as_u64() >= Some(2), "{r}");
    assert_eq!(r["completion"]["object"], "text_completion");
    assert_eq!(r["completion"]["completion_tokens"], 5);
    assert_eq!(
        r["completion_stream"]["text"], r["completion"]["text"],
        "greedy streaming and non-streaming agree"
    );
    assert_eq!(
        r["chat_stream_without_usage"]["usage_chunks"], 0,
        "no usage chunk unless stream_options.include_usage asks for it: {r}"
    );
    // Log-probabilities, greedy: each token is the most likely one at its
    // position, so it heads its own top list with the same value; the
    // values are log-probabilities, most likely first; the streamed
    // entries are the whole answer's.
    let lp = &r["chat_logprobs"];
    let entries = lp["entries"].as_array().expect("entries");
    assert_eq!(
        Some(entries.len() as u64),
        lp["completion_tokens"].as_u64(),
        "{r}"
    );
    let mut text = String::new();
    for e in entries {
        let top = e["top"].as_array().expect("top");
        assert_eq!(top.len(), 5, "{e}");
        assert_eq!(top[0][0], e["token"], "{e}");
        assert!((top[0][1].as_f64().unwrap() - e["logprob"].as_f64().unwrap()).abs() < 1e-6);
        let values: Vec<f64> = top.iter().map(|t| t[1].as_f64().expect("number")).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{e}");
        assert!(
            values.iter().all(|&v| v <= 0.0)
                && values.iter().map(|v| v.exp()).sum::<f64>() <= 1.0 + 1e-4
        );
        let bytes: Vec<u8> = serde_json::from_value(e["bytes"].clone()).expect("bytes");
        assert_eq!(bytes, e["token"].as_str().unwrap().as_bytes());
        text.push_str(e["token"].as_str().unwrap());
    }
    assert_eq!(Some(text.as_str()), lp["content"].as_str(), "{r}");
    assert_eq!(r["chat_logprobs_stream"]["entries"], lp["entries"], "{r}");
    let c = &r["completion_logprobs"];
    let tokens = c["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 5, "{r}");
    assert_eq!(c["token_logprobs"].as_array().map(Vec::len), Some(5));
    assert_eq!(c["text_offset"][0], 0);
    for (i, top) in c["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .enumerate()
    {
        let top = top.as_object().expect("a map");
        assert!(top.len() <= 3 && !top.is_empty(), "{r}");
        let best = top
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::MIN, f64::max);
        assert!(
            (best - c["token_logprobs"][i].as_f64().unwrap()).abs() < 1e-6,
            "{r}"
        );
    }
    assert_eq!(
        tokens.iter().filter_map(Value::as_str).collect::<String>(),
        c["text"].as_str().unwrap_or_default(),
        "{r}"
    );
    // Structured output: JSON that parses and matches the schema, sampled
    // at temperature 1, streamed or not; a schema feature that cannot be
    // enforced is refused by name.
    for key in ["json_schema", "json_schema_stream"] {
        let content = r[key]["content"].as_str().unwrap_or_default();
        let city: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {r}"));
        let mut keys: Vec<&String> = city.as_object().expect("an object").keys().collect();
        keys.sort();
        assert_eq!(keys, ["city", "country", "population_millions"], "{r}");
        assert!(
            city["city"].is_string() && city["country"].is_string(),
            "{r}"
        );
        assert!(
            city["population_millions"]
                .as_f64()
                .is_some_and(|p| (0.0..=100.0).contains(&p)),
            "{r}"
        );
    }
    assert_eq!(r["json_schema"]["finish_reason"], "stop", "{r}");
    assert_eq!(
        r["json_schema"]["content"], r["json_schema_stream"]["content"],
        "the same seed gives the same answer, streamed or not"
    );
    let object = &r["json_object"];
    if object["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(object["text"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {r}"));
        assert!(v.is_object(), "{r}");
    }
    let refused = &r["unsupported_schema"];
    assert_eq!(refused["status"], 400, "{r}");
    assert_eq!(refused["fields"][0][0], "response_format", "{r}");
    assert_eq!(refused["fields"][0][1], "unsupported", "{r}");
    assert!(
        refused["fields"][0][2]
            .as_str()
            .is_some_and(|m| m.contains("uniqueItems")),
        "{r}"
    );
    assert_eq!(r["unknown_model"]["status"], 404, "{r}");
    assert_eq!(r["unknown_model"]["code"], "MODEL_NOT_FOUND", "{r}");
    assert_eq!(
        r["bad_request"],
        json!({"status": 400, "code": "INVALID_REQUEST", "fields": ["max_tokens", "temperature"]}),
        "the client sees every bad field"
    );

    // Each request is in the audit trail: admitted and finished, or
    // rejected; sizes and outcomes, never the text.
    let mut queen = queen;
    queen.signal(Signal::SIGTERM);
    assert!(queen
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let trail = rbee_system_tests::read_trail(&audit.path().join("queen-rbee"));
    assert_eq!(
        trail.matches("\"inference_admitted\"").count(),
        12,
        "{trail}"
    );
    assert_eq!(trail.matches("\"inference_finished\"").count(), 12);
    assert_eq!(trail.matches("\"inference_rejected\"").count(), 1);
    assert!(
        !trail.contains("Say hello"),
        "no prompt text in the audit trail"
    );
    assert_eq!(trail.matches("\"outcome\":\"ok\"").count(), 11);
}

/// A tool call's arguments, checked against the test's two tools.
fn check_call(call: &Value, r: &Value) {
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {r}"));
    let mut keys: Vec<&String> = args.as_object().expect("an object").keys().collect();
    keys.sort();
    match call["name"].as_str() {
        Some("get_weather") => {
            assert_eq!(keys, ["city", "unit"], "{r}");
            assert!(
                args["city"]
                    .as_str()
                    .is_some_and(|c| c.chars().count() <= 40),
                "{r}"
            );
            assert!(
                ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap_or("")),
                "{r}"
            );
        }
        Some("get_time") => {
            assert_eq!(keys, ["timezone"], "{r}");
            assert!(args["timezone"].is_string(), "{r}");
        }
        other => panic!("a call of {other:?}: {r}"),
    }
}

#[test]
fn tools_are_called_through_the_queen_with_a_template_that_shows_them() {
    let dir = tempfile::tempdir().expect("model dir");
    let template = std::fs::read_to_string(
        rbee_system_tests::workspace_root()
            .join("bin/llm-worker-rbee/tests/data/hermes-tools.jinja"),
    )
    .expect("the template");
    let path = rbee_system_tests::gguf::default_model_with_chat_template(
        dir.path(),
        "smollm2-hermes-tools.gguf",
        &template,
    );
    let tools_model = format!("file:{}", path.display());
    let plain_model = default_ref();
    let hive = hive_with_models(
        DaemonSpec::new("rbee-hive").with_token(),
        Some(TEST_TOKEN),
        &[tools_model.clone(), plain_model.clone()],
    );
    let queen = ready_queen(&queen_spec(&[&hive]).with_token(), Some(TEST_TOKEN));
    let r = openai_check(
        "openai_tools_check.py",
        &queen,
        &[&tools_model, &plain_model],
    );
    eprintln!("{r}");
    // `required`, sampled at temperature 1: a parseable call of a tool,
    // and nothing else.
    let required = &r["required"];
    assert_eq!(required["finish_reason"], "tool_calls", "{r}");
    assert!(required["content"].is_null(), "{r}");
    let calls = required["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1, "parallel_tool_calls is false: {r}");
    for call in calls {
        assert_eq!(call["type"], "function", "{r}");
        assert!(
            call["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("call_")),
            "{r}"
        );
        check_call(call, &r);
    }
    // In parallel, one call or more, each parseable (a small model may go
    // on calling until the token limit).
    let parallel = r["parallel"]["calls"].as_array().expect("calls");
    assert!(!parallel.is_empty(), "{r}");
    for call in parallel {
        check_call(call, &r);
    }
    assert!(
        ["tool_calls", "length"].contains(&r["parallel"]["finish_reason"].as_str().unwrap_or("")),
        "{r}"
    );
    // A named function, one call.
    let named = r["named"]["calls"].as_array().expect("calls");
    assert_eq!(named.len(), 1, "{r}");
    assert_eq!(named[0]["name"], "get_time", "{r}");
    check_call(&named[0], &r);
    // Streamed: the same calls (same seed), id and name first, arguments after.
    let streamed = &r["required_stream"];
    assert_eq!(streamed["finish_reason"], "tool_calls", "{r}");
    let streamed_calls = streamed["calls"].as_array().expect("calls");
    assert_eq!(streamed_calls.len(), calls.len(), "{r}");
    for (s, c) in streamed_calls.iter().zip(calls) {
        assert_eq!(s["name"], c["name"], "{r}");
        assert_eq!(s["arguments"], c["arguments"], "{r}");
        assert!(
            s["id"].as_str().is_some_and(|id| id.starts_with("call_")),
            "{r}"
        );
    }
    // The follow-up turn renders the calls and their results: it is
    // answered, and its prompt holds the first one's and more.
    let follow = &r["follow_up"];
    assert!(
        follow["prompt_tokens"].as_u64() > follow["first_prompt_tokens"].as_u64().map(|n| n + 20),
        "{r}"
    );
    assert!(
        ["stop", "length", "tool_calls"].contains(&follow["finish_reason"].as_str().unwrap_or("")),
        "{r}"
    );
    // `auto`: the model decides; whatever it says, calls it makes parse.
    for call in r["auto"]["calls"].as_array().expect("calls") {
        check_call(call, &r);
    }
    // The default model's own template shows no tools: a clear 400.
    assert_eq!(
        r["plain_template"],
        json!({"status": 400, "fields": [["tools", "unsupported"]]}),
        "{r}"
    );
}

#[test]
fn embeddings_are_routed_by_the_queen_and_match_sentence_transformers() {
    let out = std::process::Command::new("bash")
        .arg(rbee_system_tests::workspace_root().join("scripts/fetch-embedding-model.sh"))
        .output()
        .expect("fetch the embedding model");
    assert!(out.status.success());
    let embedding_model = format!("file:{}", String::from_utf8_lossy(&out.stdout).trim());
    let text_model = default_ref();
    let hive = hive_with_models(
        DaemonSpec::new("rbee-hive").with_token(),
        Some(TEST_TOKEN),
        &[embedding_model.clone(), text_model.clone()],
    );
    let queen = ready_queen(&queen_spec(&[&hive]).with_token(), Some(TEST_TOKEN));
    let reference_path = rbee_system_tests::workspace_root()
        .join("bin/llm-worker-rbee/tests/data/minilm-reference.json");
    let r = openai_check(
        "openai_embeddings_check.py",
        &queen,
        &[
            &embedding_model,
            &text_model,
            &reference_path.display().to_string(),
        ],
    );
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(&reference_path).expect("reference"))
            .expect("reference JSON");
    let want = reference["embeddings"].as_array().expect("vectors");
    let got = r["default"]["vectors"].as_array().expect("vectors");
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.as_array().expect("vector"), w.as_array().expect("vector"));
        assert_eq!(g.len(), 384);
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a.as_f64().unwrap() - b.as_f64().unwrap()).abs());
        }
    }
    assert!(worst < 1e-3, "largest difference {worst}");
    assert_eq!(r["default"]["indices"], json!([0, 1, 2, 3, 4, 5]));
    let tokens: u64 = reference["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(r["default"]["prompt_tokens"], tokens);
    assert_eq!(r["default"]["model"], embedding_model);
    // As floats, the same first vector.
    let first = r["float"]["vectors"][0].as_array().expect("floats");
    for (a, b) in first.iter().zip(got[0].as_array().expect("vector")) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-6);
    }
    assert_eq!(
        r["dimensions"],
        json!({"status": 400, "code": "INVALID_REQUEST", "fields": ["dimensions"]}),
        "{r}"
    );
    assert_eq!(r["chat_on_embedding_model"]["status"], 400, "{r}");
    assert_eq!(r["embeddings_on_text_model"]["status"], 400, "{r}");
}
