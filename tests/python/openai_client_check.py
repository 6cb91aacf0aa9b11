"""Drive the queen with the official `openai` client; print what it parsed.

Usage: python openai_client_check.py BASE_URL API_KEY MODEL
Every call goes through the client's own response models, so a field the
client needs and the queen does not send fails here.
"""
import json
import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
out = {}

models = client.models.list()
out["models"] = [m.id for m in models.data]

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
)
out["chat"] = {
    "id": chat.id,
    "object": chat.object,
    "content": chat.choices[0].message.content,
    "role": chat.choices[0].message.role,
    "finish_reason": chat.choices[0].finish_reason,
    "completion_tokens": chat.usage.completion_tokens,
}

pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count to five."}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out["chat_stream"] = {"text": "".join(pieces), "chunks": len(pieces), "finish_reason": finish, "completion_tokens": usage}

plain_usage_chunks = 0
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=4, stream=True
):
    plain_usage_chunks += chunk.usage is not None or not chunk.choices
out["chat_stream_without_usage"] = {"usage_chunks": plain_usage_chunks}


def token_entries(entries):
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top": [[t.token, t.logprob] for t in e.top_logprobs],
        }
        for e in entries
    ]


chat_lp = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=6,
    temperature=0,
    logprobs=True,
    top_logprobs=5,
)
out["chat_logprobs"] = {
    "content": chat_lp.choices[0].message.content,
    "completion_tokens": chat_lp.usage.completion_tokens,
    "entries": token_entries(chat_lp.choices[0].logprobs.content),
}
streamed_entries = []
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=6,
    temperature=0,
    logprobs=True,
    top_logprobs=5,
    stream=True,
):
    for choice in chunk.choices:
        if choice.logprobs is not None and choice.logprobs.content:
            streamed_entries += token_entries(choice.logprobs.content)
out["chat_logprobs_stream"] = {"entries": streamed_entries}

text_lp = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0, logprobs=3)
lp = text_lp.choices[0].logprobs
out["completion_logprobs"] = {
    "text": text_lp.choices[0].text,
    "tokens": lp.tokens,
    "token_logprobs": lp.token_logprobs,
    "top_logprobs": lp.top_logprobs,
    "text_offset": lp.text_offset,
}

city_schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 100},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
structured = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name a large city, as JSON."}],
    max_tokens=120,
    temperature=1.0,
    seed=4,
    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": city_schema, "strict": True}},
)
out["json_schema"] = {
    "content": structured.choices[0].message.content,
    "finish_reason": structured.choices[0].finish_reason,
}
streamed_json = "".join(
    c.choices[0].delta.content or ""
    for c in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a large city, as JSON."}],
        max_tokens=120,
        temperature=1.0,
        seed=4,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": city_schema}},
    )
    if c.choices
)
out["json_schema_stream"] = {"content": streamed_json}
any_object = client.completions.create(
    model=model, prompt="A JSON object:", max_tokens=60, temperature=0.8, seed=1,
    extra_body={"response_format": {"type": "json_object"}},
)
out["json_object"] = {"text": any_object.choices[0].text, "finish_reason": any_object.choices[0].finish_reason}
try:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
    )
    out["unsupported_schema"] = "no error"
except openai.BadRequestError as e:
    body = e.body if isinstance(e.body, dict) else {}
    out["unsupported_schema"] = {
        "status": e.status_code,
        "fields": [[f.get("field"), f.get("constraint"), f.get("message")] for f in body.get("details", {}).get("fields", [])],
    }

completion = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0)
out["completion"] = {
    "object": completion.object,
    "text": completion.choices[0].text,
    "finish_reason": completion.choices[0].finish_reason,
    "completion_tokens": completion.usage.completion_tokens,
}

texts = [c.choices[0].text for c in client.completions.create(
    model=model, prompt="The sky is", max_tokens=5, temperature=0, stream=True
) if c.choices]
out["completion_stream"] = {"text": "".join(texts)}

try:
    client.chat.completions.create(model="hf:nobody/nothing", messages=[{"role": "user", "content": "hi"}])
    out["unknown_model"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.body.get("code") if isinstance(e.body, dict) else None}

try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], temperature=-1, max_tokens=0
    )
    out["bad_request"] = "no error"
except openai.BadRequestError as e:
    body = e.body if isinstance(e.body, dict) else {}
    out["bad_request"] = {
        "status": e.status_code,
        "code": body.get("code"),
        "fields": [f.get("field") for f in body.get("details", {}).get("fields", [])],
    }

print(json.dumps(out))
