//! The queen's routing by conversation, with two real workers: a chat's
//! next turn goes to the worker whose KV cache holds its earlier turns.

use rbee_system_tests::queen::{
    client, default_ref, hive_with_model, queen_spec, ready_queen, send, wait_ready_workers,
};
use rbee_system_tests::DaemonSpec;
use serde_json::{json, Value};

#[test]
fn a_conversations_next_turn_goes_to_the_worker_that_holds_its_earlier_turns() {
    let hive = hive_with_model(DaemonSpec::new("rbee-hive"), None);
    let queen = ready_queen(&queen_spec(&[&hive]), None);
    for _ in 0..2 {
        let (status, body, _) = send(
            client()
                .post(hive.url("/v1/workers/spawn"))
                .json(&json!({"model_ref": default_ref(), "slots": 4})),
        );
        assert_eq!(status, 202, "{body}");
    }
    wait_ready_workers(&queen, 2, None);
    let system = "You are a patient tutor. ".repeat(40);
    let chat = |messages: &Value| {
        let (status, body, _) = send(
            client()
                .post(queen.url("/v1/chat/completions"))
                .json(&json!({"messages": messages, "temperature": 0, "max_tokens": 12})),
        );
        assert_eq!(status, 200, "{body}");
        body
    };
    // Three conversations, two turns each, the second turn repeating the
    // first: each second turn finds the first in its worker's cache. (With
    // load alone, each would have an even chance of the other worker.)
    for topic in ["fractions", "volcanoes", "the French revolution"] {
        let mut messages = json!([
            {"role": "system", "content": system},
            {"role": "user", "content": format!("Tell me about {topic}.")}
        ]);
        let first = chat(&messages);
        let turn1 = first["usage"]["prompt_tokens"].as_u64().expect("usage");
        let answer = first["choices"][0]["message"]["content"].clone();
        let list = messages.as_array_mut().expect("messages");
        list.push(json!({"role": "assistant", "content": answer}));
        list.push(json!({"role": "user", "content": "And why does that matter?"}));
        let second = chat(&messages);
        let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached tokens");
        assert!(
            cached >= turn1 - 1,
            "{topic}: {cached} of the first turn's {turn1} prompt tokens cached: {second}"
        );
    }
}
