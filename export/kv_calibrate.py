"""Scales of an 8-bit attention cache (quantize/kv_cache.py), from the model's own keys and values on a text.

The model (fp32 buffers) reads the calibration text through TorchStream, chunk by chunk; after each piece every
layer's buffer rows in use are measured: per KV head, the largest |value| per channel and the largest key length
per rotary pair (rotation-invariant, so it bounds the key at every position the runtime re-rotates it to). The
row level's slots are left out: they are tokens' own rows, held rows_key_scale louder, which scales_from_extremes
allows for in the layers that read them. What this leaves out: the rounding itself (quantize/kv_cache.py).
"""

from __future__ import annotations

import numpy as np
import torch

from cortex_edge.model.lm import CortexLM, TorchStream
from cortex_edge.quantize import kv_cache
from cortex_edge.runtime import ring

TOKENS = 2048  # Genesis 1:1 onwards: two windows of SmolLM2, the sinks and a moving region included


def calibration_ids(tokenizer, vocab: int, tokens: int = TOKENS) -> np.ndarray:
    from cortex_edge.model.train import TEXT  # Genesis (KJV), shipped with the package

    ids = np.asarray(tokenizer.encode(TEXT.read_text(encoding="utf-8")[:tokens * 8]).ids[:tokens], np.int64)
    if ids.size < 2 or ids.max() >= vocab:
        raise ValueError("the calibration text does not encode into this model's vocabulary")
    return ids


@torch.no_grad()
def calibrate(model: CortexLM, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(key scale, value scale) (KV, hd)] a layer for model (fp32 buffers) over ids."""
    cfg = model.cfg
    lay = ring.Layout.of(cfg)
    ts = TorchStream(model)
    KV, hd, h = cfg.n_kv_heads, cfg.head_dim, cfg.head_dim // 2
    kmax = np.zeros((cfg.n_layers, KV, h), np.float32)
    vmax = np.zeros((cfg.n_layers, KV, hd), np.float32)
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
