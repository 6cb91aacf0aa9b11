"""Call tools through the queen with the official `openai` client; print what it parsed.

Usage: python openai_tools_check.py BASE_URL API_KEY TOOLS_MODEL PLAIN_MODEL
TOOLS_MODEL has a chat template that shows tools (Hermes style); PLAIN_MODEL
has one that does not.
"""
import json
import sys

import openai

base_url, api_key, tools_model, plain_model = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
out = {}

weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
clock = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
question = [{"role": "user", "content": "What is the weather in Paris?"}]


def calls_of(message):
    return [
        {"id": c.id, "type": c.type, "name": c.function.name, "arguments": c.function.arguments}
        for c in (message.tool_calls or [])
    ]


required = client.chat.completions.create(
    model=tools_model, messages=question, tools=[weather, clock], tool_choice="required",
    parallel_tool_calls=False, temperature=1.0, seed=1, max_tokens=200,
)
out["required"] = {
    "finish_reason": required.choices[0].finish_reason,
    "content": required.choices[0].message.content,
    "calls": calls_of(required.choices[0].message),
}

parallel = client.chat.completions.create(
    model=tools_model, messages=question, tools=[weather, clock], tool_choice="required",
    temperature=1.0, seed=3, max_tokens=120,
)
out["parallel"] = {
    "finish_reason": parallel.choices[0].finish_reason,
    "calls": calls_of(parallel.choices[0].message),
}

named = client.chat.completions.create(
    model=tools_model, messages=question, tools=[weather, clock],
    tool_choice={"type": "function", "function": {"name": "get_time"}},
    parallel_tool_calls=False, temperature=1.0, seed=2, max_tokens=200,
)
out["named"] = {
    "finish_reason": named.choices[0].finish_reason,
    "calls": calls_of(named.choices[0].message),
}

streamed, finish, first_chunk_calls = {}, None, []
for chunk in client.chat.completions.create(
    model=tools_model, messages=question, tools=[weather, clock], tool_choice="required",
    parallel_tool_calls=False, temperature=1.0, seed=1, max_tokens=200, stream=True,
):
    for choice in chunk.choices:
        for d in choice.delta.tool_calls or []:
            call = streamed.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                call["id"] = d.id
                first_chunk_calls.append(d.index)
            if d.function and d.function.name:
                call["name"] += d.function.name
            if d.function and d.function.arguments:
                call["arguments"] += d.function.arguments
        if choice.finish_reason:
            finish = choice.finish_reason
out["required_stream"] = {
    "finish_reason": finish,
    "calls": [streamed[i] for i in sorted(streamed)],
    "ids_in_first_chunks": first_chunk_calls,
}

first = required.choices[0].message
follow_up = client.chat.completions.create(
    model=tools_model,
    messages=question + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in first.tool_calls
        ]},
    ] + [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}
        for c in first.tool_calls
    ],
    tools=[weather, clock], temperature=0, max_tokens=40,
)
out["follow_up"] = {
    "finish_reason": follow_up.choices[0].finish_reason,
    "content": follow_up.choices[0].message.content,
    "calls": calls_of(follow_up.choices[0].message),
    "prompt_tokens": follow_up.usage.prompt_tokens,
    "first_prompt_tokens": required.usage.prompt_tokens,
}

auto = client.chat.completions.create(
    model=tools_model, messages=question, tools=[weather], temperature=0, max_tokens=60,
)
out["auto"] = {
    "finish_reason": auto.choices[0].finish_reason,
    "content": auto.choices[0].message.content,
    "calls": calls_of(auto.choices[0].message),
}

try:
    client.chat.completions.create(model=plain_model, messages=question, tools=[weather])
    out["plain_template"] = "no error"
except openai.BadRequestError as e:
    body = e.body if isinstance(e.body, dict) else {}
    out["plain_template"] = {
        "status": e.status_code,
        "fields": [[f.get("field"), f.get("constraint")] for f in body.get("details", {}).get("fields", [])],
    }

print(json.dumps(out))
