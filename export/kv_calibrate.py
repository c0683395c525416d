"""Scales of an 8-bit attention cache (quantize/kv_cache.py), from the model's own keys and values on texts.

The model (fp32 buffers) reads each calibration text through its own TorchStream, chunk by chunk; after each piece
every layer's buffer rows in use are measured: per KV head, the largest |value| per channel and the largest key
length per rotary pair (rotation-invariant, so it bounds the key at every position the runtime re-rotates it to).
The scales cover the largest of all texts. The texts are of three kinds, because static scales clip whatever their
text did not reach: prose alone left the keys and values of digits up to 1.6 and 4.5 times out of range (with those
scales builtin:recall recalled 1 pass key in 10 at 1k and at 4k, with these 10 in 10; SmolLM2's values on code
reached 3.5 times its prose's):
- prose: Genesis (KJV), shipped with the package, from its first token;
- a chat through the model's own template (its control tokens and markup), whose message holds a pass key in filler;
- code and numbers, generated from a seed.
The row level's slots are left out: they are tokens' own rows, held rows_key_scale louder, which
scales_from_extremes allows for in the layers that read them. What this leaves out: the rounding itself
(quantize/kv_cache.py).
"""

from __future__ import annotations

import numpy as np
import torch

from cortex_edge.model.lm import CortexLM, TorchStream
from cortex_edge.quantize import kv_cache
from cortex_edge.runtime import ring

TOKENS = 2048  # of prose: two windows of SmolLM2, the sinks and a moving region included
OTHER_TOKENS = 1024  # of each other kind
SEED = 7  # the generated texts' (below runtime.niah.HELD_OUT_SEED: the evaluations' samples are never seen)


def _code_and_numbers(seed: int, chars: int) -> str:
    rng = np.random.default_rng(seed)
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        a, b, c = (int(x) for x in rng.integers(0, 100_000, 3))
        parts.append(f"def f_{a % 997}(x, y=[{b}, {c % 97}]):\n    return x * {a % 89} + sum(y) / {c % 7 + 1}  # {b:05d}\n"
                     f'{{"id": {a}, "value": {rng.normal():.6f}, "tag": "k-{c % 1000:03d}", "ok": true}},\n'
                     f"| {a % 1000:4d} | {b / 7:10.3f} | {c:6d} | 0x{a:05X} |\n")
    return "".join(parts)


def calibration_ids(tokenizer, vocab: int, tok_meta: dict | None = None, tokens: int = TOKENS) -> list[np.ndarray]:
    """The calibration texts as token ids, one array each (each is read from an empty stream)."""
    from cortex_edge.model.train import TEXT
    from cortex_edge.runtime import niah
    from cortex_edge.runtime.text import ChatFormat, ChatTemplateError

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def enc(text: str, n: int) -> np.ndarray:
        return np.asarray(ids(text)[:n], np.int64)

    prose = enc(TEXT.read_text(encoding="utf-8")[:tokens * 8], tokens)
    haystack = tokenizer.decode(niah.make_sample(ids, OTHER_TOKENS * 3 // 4, SEED)[0])
    meta = tok_meta or {}
    talk = [{"role": "user", "content": haystack}, {"role": "assistant", "content": "The pass key is 40817."},
            {"role": "user", "content": "Thank you. Now list three numbers and a line of code."}]
    try:
        chat = ChatFormat(meta.get("chat_template", ""), meta.get("bos", "") or "").render(talk, True)
    except ChatTemplateError:  # a template that refuses this conversation: its messages as plain text
        chat = ChatFormat("").render(talk, True)
    texts = [prose, enc(chat, OTHER_TOKENS), enc(_code_and_numbers(SEED, OTHER_TOKENS * 8), OTHER_TOKENS)]
    if any(t.size < 2 or t.max() >= vocab for t in texts):
        raise ValueError("the calibration texts do not encode into this model's vocabulary")
    return texts


@torch.no_grad()
def calibrate(model: CortexLM, texts: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(key scale, value scale) (KV, hd)] a layer for model (fp32 buffers) over the texts (token ids each)."""
    cfg = model.cfg
    lay = ring.Layout.of(cfg)
    KV, hd, h = cfg.n_kv_heads, cfg.head_dim, cfg.head_dim // 2
    kmax = np.zeros((cfg.n_layers, KV, h), np.float32)
    vmax = np.zeros((cfg.n_layers, KV, hd), np.float32)
    for ids in texts:
        ts = TorchStream(model)
        pos = 0
        for n in ring.split_pieces(0, ids.size, cfg.cms.chunk):
            ts.feed(torch.from_numpy(ids[pos:pos + n])[None])
            pos += n
            used = int(lay.index(ts.n - 1, ts.prepared)) + 1
            for i, (k, v) in enumerate(zip(ts.keys, ts.values)):
                k, v = k[0, :, lay.rows:used].numpy(), v[0, :, lay.rows:used].numpy()  # (KV, rows, hd)
                kmax[i] = np.maximum(kmax[i], np.sqrt(k[..., :h] ** 2 + k[..., h:] ** 2).max(axis=1))
                vmax[i] = np.maximum(vmax[i], np.abs(v).max(axis=1))
    rl = cfg.cms.row_layers(cfg.n_layers) if cfg.cms.rows else range(0)
    return [kv_cache.scales_from_extremes(kmax[i], vmax[i], cfg.cms.rows_key_scale if i in rl else 1.0)
            for i in range(cfg.n_layers)]
