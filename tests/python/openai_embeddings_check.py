"""Ask the queen for embeddings with the official `openai` client; print what it parsed.

Usage: python openai_embeddings_check.py BASE_URL API_KEY EMBEDDING_MODEL TEXT_MODEL SENTENCES_JSON
The client asks for base64 unless told otherwise and decodes it itself.
"""
import json
import sys

import openai

base_url, api_key, embedding_model, text_model, sentences_path = sys.argv[1:6]
sentences = json.load(open(sentences_path))["sentences"]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
out = {}

default = client.embeddings.create(model=embedding_model, input=sentences)
out["default"] = {
    "vectors": [d.embedding for d in default.data],
    "indices": [d.index for d in default.data],
    "prompt_tokens": default.usage.prompt_tokens,
    "model": default.model,
}
floats = client.embeddings.create(model=embedding_model, input=sentences[0], encoding_format="float")
out["float"] = {"vectors": [d.embedding for d in floats.data]}


def refused(call):
    try:
        call()
        return "no error"
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        fields = [f.get("field") for f in body.get("details", {}).get("fields", [])]
        return {"status": e.status_code, "code": body.get("code"), "fields": fields}


out["dimensions"] = refused(lambda: client.embeddings.create(model=embedding_model, input="x", dimensions=100))
out["chat_on_embedding_model"] = refused(lambda: client.chat.completions.create(
    model=embedding_model, messages=[{"role": "user", "content": "hi"}]))
out["embeddings_on_text_model"] = refused(lambda: client.embeddings.create(model=text_model, input="x"))
print(json.dumps(out))
