//! The OpenAI bodies' checks and their round trip through the queen.

use super::*;
use proptest::prelude::*;
use serde_json::json;

fn any_request() -> impl Strategy<Value = (Route, Value)> {
    let text = "[ -~\\PC]{1,12}";
    let message = (prop::sample::select(ROLES.to_vec()), text)
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    (
        any::<bool>(),
        prop::collection::vec(message, 1..4),
        "[a-z][ -~\\PC]{0,11}",
        prop::option::of("[a-z]{1,8}"),
        prop::option::of(1u32..=MAX_TOKENS_LIMIT),
        prop::option::of(0.0f32..2.0),
        prop::option::of(0.01f32..=1.0),
        prop::option::of(0u32..100),
        prop::option::of(any::<u64>()),
        prop::collection::vec(text, 0..3),
        (
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
            prop::option::of(0u32..=MAX_TOP_LOGPROBS),
            prop::option::of(prop::sample::select(vec![
                json!({"type": "text"}),
                json!({"type": "json_object"}),
                json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "properties": {"k": {"type": "string"}}}}}),
            ])),
        ),
    )
        .prop_map(
            |(
                chat,
                messages,
                prompt,
                model,
                max,
                temp,
                top_p,
                top_k,
                seed,
                stop,
                (stream, include_usage, logprobs, format),
            )| {
                let mut body = if chat {
                    json!({ "messages": messages })
                } else {
                    json!({ "prompt": prompt })
                };
                let set = |body: &mut Value, k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        body[k] = v;
                    }
                };
                set(&mut body, "model", model.map(Value::from));
                set(&mut body, "max_tokens", max.map(Value::from));
                set(&mut body, "temperature", temp.map(Value::from));
                set(&mut body, "top_p", top_p.map(Value::from));
                set(&mut body, "top_k", top_k.map(Value::from));
                set(&mut body, "seed", seed.map(Value::from));
                set(&mut body, "stream", stream.map(Value::from));
                if stream == Some(true) {
                    set(
                        &mut body,
                        "stream_options",
                        include_usage.map(|u| json!({"include_usage": u})),
                    );
                }
                if chat {
                    set(&mut body, "logprobs", logprobs.map(|_| Value::from(true)));
                    set(&mut body, "top_logprobs", logprobs.map(Value::from));
                } else {
                    set(&mut body, "logprobs", logprobs.map(Value::from));
                }
                set(&mut body, "response_format", format);
                body["stop"] = json!(stop);
                let route = if chat {
                    Route::Chat
                } else {
                    Route::Completions
                };
                (route, body)
            },
        )
}

proptest! {
    #[test]
    fn a_forwarded_body_parses_back_to_the_request_it_came_from((route, body) in any_request()) {
        let first = OpenAiRequest::parse(route, &body).expect("the generated bodies are valid");
        let forwarded = serde_json::to_value(first.body(route)).unwrap();
        let again = OpenAiRequest::parse(route, &forwarded).expect("a forwarded body parses");
        prop_assert_eq!(again, first);
    }
}

#[test]
fn logprobs_are_a_flag_and_a_count_on_chat_and_a_count_on_completions() {
    let user = json!([{"role": "user", "content": "hi"}]);
    let chat = |extra: Value| {
        let mut body = json!({ "messages": user });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        OpenAiRequest::parse(Route::Chat, &body).map(|r| r.request.logprobs)
    };
    assert_eq!(chat(json!({})), Ok(None));
    assert_eq!(chat(json!({"logprobs": false})), Ok(None));
    assert_eq!(chat(json!({"logprobs": true})), Ok(Some(0)));
    assert_eq!(
        chat(json!({"logprobs": true, "top_logprobs": 20})),
        Ok(Some(20))
    );
    let refused = |r: Result<Option<u32>, Vec<FieldError>>| {
        r.expect_err("refused")
            .into_iter()
            .map(|e| (e.field, e.constraint))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        refused(chat(json!({"logprobs": true, "top_logprobs": 21}))),
        [("top_logprobs".to_owned(), "range".to_owned())]
    );
    assert_eq!(
        refused(chat(json!({"top_logprobs": 3}))),
        [("top_logprobs".to_owned(), "requires".to_owned())]
    );
    assert_eq!(
        refused(chat(json!({"logprobs": 2}))),
        [("logprobs".to_owned(), "type".to_owned())]
    );
    let completion = |logprobs: Value| {
        OpenAiRequest::parse(
            Route::Completions,
            &json!({"prompt": "hi", "logprobs": logprobs}),
        )
        .map(|r| r.request.logprobs)
    };
    assert_eq!(completion(json!(3)), Ok(Some(3)));
    assert_eq!(completion(json!(0)), Ok(Some(0)));
    assert_eq!(completion(Value::Null), Ok(None));
    assert_eq!(
        refused(completion(json!(21))),
        [("logprobs".to_owned(), "range".to_owned())]
    );
}

#[test]
fn response_format_is_text_any_object_or_a_schema() {
    let parse = |format: Value| {
        OpenAiRequest::parse(
            Route::Chat,
            &json!({"messages": [{"role": "user", "content": "hi"}], "response_format": format}),
        )
        .map(|r| r.request.constraint)
    };
    assert_eq!(parse(json!({"type": "text"})), Ok(None));
    assert_eq!(
        parse(json!({"type": "json_object"})),
        Ok(Some(Constraint::JsonObject))
    );
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    assert_eq!(
        parse(
            json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}})
        ),
        Ok(Some(Constraint::JsonSchema { schema }))
    );
    let bad = |format: Value| {
        parse(format)
            .expect_err("refused")
            .into_iter()
            .map(|e| e.field)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        bad(json!({"type": "json_schema", "json_schema": {"name": "x"}})),
        ["response_format.json_schema.schema"]
    );
    assert_eq!(
        bad(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}})),
        ["response_format.json_schema.schema"]
    );
    assert_eq!(bad(json!({"type": "yaml"})), ["response_format.type"]);
    assert_eq!(bad(json!("json")), ["response_format"]);
}

#[test]
fn tools_and_tool_choice_are_read_and_checked() {
    let body = |extra: Value| {
        let mut body = json!({"messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
        ]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        OpenAiRequest::parse(Route::Chat, &body)
    };
    let weather = json!({"type": "function", "function": {"name": "weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let r = body(json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "weather"}},
                        "parallel_tool_calls": false}))
    .expect("valid");
    assert_eq!(r.tools.tools.len(), 1);
    assert_eq!(r.tools.choice, ToolChoice::Function("weather".into()));
    assert!(!r.tools.parallel);
    assert_eq!(r.messages[1].tool_calls[0].function.name, "weather");
    assert_eq!(r.messages[1].content, "");
    assert_eq!(r.messages[2].tool_call_id.as_deref(), Some("call_1"));
    let again = OpenAiRequest::parse(
        Route::Chat,
        &serde_json::to_value(r.body(Route::Chat)).unwrap(),
    )
    .expect("the forwarded body parses");
    assert_eq!(again, r);
    let refused = |extra: Value| {
        body(extra)
            .expect_err("refused")
            .into_iter()
            .map(|e| e.field)
            .collect::<Vec<_>>()
    };
    assert_eq!(refused(json!({"tool_choice": "required"})), ["tool_choice"]);
    assert_eq!(
        refused(
            json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "other"}}})
        ),
        ["tool_choice"]
    );
    assert_eq!(
        refused(json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}]})),
        ["tools[0].function.name"]
    );
    assert_eq!(
        refused(json!({"tools": [{"type": "code_interpreter"}]})),
        ["tools[0]"]
    );
    assert_eq!(refused(json!({"tool_choice": "always"})), ["tool_choice"]);
}

#[test]
fn include_usage_needs_a_stream() {
    let body = |stream: bool, options: Value| json!({"prompt": "hi", "stream": stream, "stream_options": options});
    let parse = |b: Value| OpenAiRequest::parse(Route::Completions, &b);
    assert!(
        parse(body(true, json!({"include_usage": true})))
            .expect("valid")
            .include_usage
    );
    assert!(!parse(body(true, json!({}))).expect("valid").include_usage);
    assert_eq!(
        parse(body(false, json!({"include_usage": true}))).expect_err("refused")[0].constraint,
        "requires"
    );
    assert_eq!(
        parse(body(true, json!({"include_usage": "yes"}))).expect_err("refused")[0].field,
        "stream_options.include_usage"
    );
}

fn fields(route: Route, body: Value) -> Vec<String> {
    OpenAiRequest::parse(route, &body)
        .expect_err("refused")
        .into_iter()
        .map(|e| e.field)
        .collect()
}

#[test]
fn asking_for_what_is_not_served_is_refused_and_neutral_values_are_not() {
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let tool = json!({"type": "function", "function": {"name": "f", "parameters": {}}});
    assert_eq!(
        fields(
            Route::Chat,
            chat(json!({
                "functions": [tool["function"]],
                "function_call": "auto",
            }))
        ),
        ["functions", "function_call"]
    );
    assert_eq!(
        fields(Route::Completions, json!({"prompt": "hi", "tools": [tool]})),
        ["tools"]
    );
    assert_eq!(
        fields(
            Route::Completions,
            json!({"prompt": "hi", "logprobs": 2, "echo": true, "suffix": "end", "best_of": 3})
        ),
        ["echo", "suffix", "best_of"]
    );
    assert_eq!(
        fields(Route::Chat, chat(json!({"modalities": ["text", "audio"]}))),
        ["modalities"]
    );
    let neutral = chat(json!({
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logprobs": false,
        "top_logprobs": 0,
        "functions": null,
        "modalities": ["text"],
        "echo": false,
        "suffix": "",
        "best_of": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
    }));
    assert_eq!(
        fields(
            Route::Chat,
            chat(json!({
                "presence_penalty": 0.5,
                "frequency_penalty": -1,
                "logit_bias": {"50256": -100},
                "web_search_options": {},
            }))
        ),
        [
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "web_search_options"
        ]
    );
    assert!(OpenAiRequest::parse(Route::Chat, &neutral).is_ok());
}

#[test]
fn a_good_chat_becomes_messages_and_native_settings() {
    let body = json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": null},
        ],
        "max_completion_tokens": 7,
        "temperature": 0,
        "stop": "\n",
        "stream": true,
        "n": 1,
        "user": "ignored",
        "logit_bias": {},
    });
    let parsed = OpenAiRequest::parse(Route::Chat, &body).unwrap();
    assert_eq!(parsed.messages.len(), 3);
    assert_eq!(parsed.messages[1].content, "Hi there");
    assert_eq!(parsed.messages[2].content, "");
    let r = parsed.request;
    assert_eq!(r.model.as_deref(), Some("m"));
    assert_eq!((r.max_tokens, r.temperature, r.stream), (7, 0.0, true));
    assert_eq!(r.stop, ["\n"]);
    assert!(r.prompt.is_empty());
}

#[test]
fn defaults_follow_openai_not_the_native_route() {
    let parsed = OpenAiRequest::parse(Route::Completions, &json!({"prompt": "x"})).unwrap();
    let r = parsed.request;
    assert_eq!(r.prompt, "x");
    assert_eq!(
        (r.max_tokens, r.temperature, r.top_p, r.stream),
        (DEFAULT_MAX_TOKENS, 1.0, 1.0, false)
    );
    let one = OpenAiRequest::parse(Route::Completions, &json!({"prompt": ["y"]})).unwrap();
    assert_eq!(one.request.prompt, "y");
}

#[test]
fn every_bad_field_is_named_types_and_ranges_together() {
    let got = fields(
        Route::Chat,
        json!({
            "messages": [],
            "temperature": -1,
            "max_tokens": 0,
            "top_p": "high",
            "stream": "yes",
            "model": 3,
            "n": 2,
            "stop": ["a", 1],
        }),
    );
    assert_eq!(
        got,
        [
            "messages",
            "model",
            "top_p",
            "stop[1]",
            "stream",
            "n",
            "max_tokens",
            "temperature"
        ]
    );
}

#[test]
fn each_message_is_checked_with_its_index() {
    let got = fields(
        Route::Chat,
        json!({"messages": [
            {"role": "wizard", "content": "x"},
            {"content": "x"},
            {"role": "user"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {}}, {"type": "text"}]},
            "hello",
            {"role": "user", "content": 5},
        ]}),
    );
    assert_eq!(
        got,
        [
            "messages[0].role",
            "messages[1].role",
            "messages[2].content",
            "messages[3].content[0].type",
            "messages[3].content[1].text",
            "messages[4]",
            "messages[5].content",
        ]
    );
}

#[test]
fn the_prompt_and_max_completion_tokens_are_named_as_sent() {
    let got = fields(
        Route::Completions,
        json!({"prompt": "  ", "max_completion_tokens": 5000, "max_tokens": 3}),
    );
    assert_eq!(got, ["prompt", "max_completion_tokens"]);
    assert_eq!(
        fields(Route::Completions, json!({"prompt": ["a", "b"]})),
        ["prompt"]
    );
    assert_eq!(fields(Route::Completions, json!({"prompt": 7})), ["prompt"]);
    assert_eq!(fields(Route::Completions, json!([1, 2])), ["body"]);
    assert_eq!(
        fields(
            Route::Completions,
            json!({"prompt": "x", "max_tokens": -3, "seed": -1})
        ),
        ["seed", "max_tokens"]
    );
}

#[test]
fn huge_numbers_are_refused_not_wrapped() {
    let got = fields(
        Route::Completions,
        json!({"prompt": "x", "max_tokens": 1u64 << 40, "temperature": 1e300, "top_k": 1u64 << 40}),
    );
    assert_eq!(got, ["max_tokens", "temperature"]);
}
