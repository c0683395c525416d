"""Needle in a haystack (passkey retrieval) through the runtime: onnxruntime + the NumPy jump map.

The task of Mohtashami & Jaggi (landmark attention): a 5-digit pass key hidden at a chosen depth in a
haystack of repeated filler, then a question; greedy free-running decoding must produce the key.
Samples come from seeds >= HELD_OUT_SEED (training, when it exists, uses seeds below). Accuracy per
length comes with a Wilson 95 % interval and the chance baseline (1 / 90000). `memory=False` runs
the same bundle with the sidecar switched off (reads see an empty memory, no writes), which must fail
beyond the attention window if the memory is what does the work.
What this leaves out: training (the sidecar learns this task in `cortex-edge train`: cortex_edge/model/train.py).
"""

from __future__ import annotations

import math
import re
import time

import numpy as np

from cortex_edge.runtime.engine import Engine

HELD_OUT_SEED = 1_000_000
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
CHANCE = 1 / 90000


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def make_sample(encode, length: int, seed: int, key: str | None = None,
                max_depth: float = 1.0) -> tuple[list[int], str, float]:
    """-> (token ids of haystack + needle + question, the key, needle depth in [0, max_depth])."""
    rng = np.random.default_rng(seed)
    k = str(int(rng.integers(10000, 100000)))
    key = key or k
    depth = float(rng.uniform(0.0, 1.0)) * max_depth
    filler = encode(FILLER)
    needle = encode(NEEDLE.format(key=key))
    question = encode(QUESTION)
    n_fill = max(0, length - len(needle) - len(question))
    hay = (filler * (n_fill // len(filler) + 1))[:n_fill]
    at = int(depth * n_fill)
    return hay[:at] + needle + hay[at:] + question, key, depth


def answer(engine: Engine, ids: list[int], decode, max_new: int = 8, memory: bool = True) -> str:
    st = engine.new_state()
    logits = engine.feed(st, ids, memory=memory)
    out = []
    for _ in range(max_new):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = engine.feed(st, [tok], memory=memory)
    return decode(out)


def run(engine: Engine, lengths: list[int], samples: int, memory_modes=(True, False), progress=None,
        state_formats: list[str] | None = None, first: int = 0) -> dict:
    """Accuracy per (length, state format, sidecar on/off) over held-out samples first .. first+samples-1.
    The sidecar-off ablation never touches the memory, so it runs once per length whatever the state formats."""
    from cortex_edge.runtime.text import load_tokenizer

    tok = load_tokenizer(engine.bundle.file(engine.bundle.tokenizer_file))

    def encode(s):
        return tok.encode(s, add_special_tokens=False).ids

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    rows = []
    formats = state_formats or [engine.state_format]
    own = engine.state_format
    for length in lengths:
        for fmt, mem in [(f, True) for f in formats if True in memory_modes] + \
                        ([(formats[0], False)] if False in memory_modes else []):
            engine.state_format = fmt
            hits, t0, cases = 0, time.perf_counter(), []
            for i in range(first, first + samples):
                ids, key, depth = make_sample(encode, length, HELD_OUT_SEED + length * 1000 + i)
                text = answer(engine, ids, decode, memory=mem)
                got = re.findall(r"\d{5}", text)
                ok = bool(got) and got[0] == key
                hits += ok
                cases.append({"key": key, "depth": round(depth, 3), "answer": text, "correct": ok})
                if progress:
                    progress(1)
            lo, hi = wilson(hits, samples)
            rows.append({"length": length, "memory": mem, "state": fmt if mem else None, "samples": samples,
                         "accuracy": hits / samples,
                         "ci95": [lo, hi], "chance": CHANCE, "beyond_window": length > engine.cfg.sinks + engine.cfg.window,
                         "seconds": time.perf_counter() - t0, "cases": cases})
    engine.state_format = own
    return {"bundle": str(engine.bundle.path), "weights": engine.bundle.weights, "state": engine.bundle.state_format,
            "kv_cache": engine.bundle.kv_cache,
            "window": engine.cfg.window, "sinks": engine.cfg.sinks, "held_out_seed": HELD_OUT_SEED, "first": first,
            "rows": rows}
