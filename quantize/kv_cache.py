"""The 8-bit attention cache: int8 rows with static scales per layer, KV head and channel.

onnxruntime's GroupQueryAttention keeps its cache this way (kv_cache_bit_width 8, k_quant_type and v_quant_type
PER_CHANNEL, k_scale / v_scale of shape (1, KV, 1, hd)): it stores a new row as clip(rint(x / scale), -128, 127)
and reads q * scale (bench/gqa_attention.py checks that against NumPy). Everything else that writes the buffers
(the runtime's chunk rows, sinks, rows and re-rotations; the torch reference) rounds the same way, here.

Scales come from a calibration run at export (export/kv_calibrate.py): a layer's largest |value| per channel over
the calibration texts, its largest key length per rotary pair (a key's channels i and i + hd/2 rotate together, so
the pair's length bounds both at every position), times rows_key_scale in the layers that read the row level
(their rows are stored louder), over 127.
What this leaves out: the CMS state's own int8 format (state_codec.py), weights (weights.py).
"""

from __future__ import annotations

import numpy as np

QMIN, QMAX = -128, 127


def quantize(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x (..., hd) float -> int8 steps of scale (broadcastable to x), as GroupQueryAttention stores them."""
    return np.clip(np.rint(np.asarray(x, np.float32) / scale), QMIN, QMAX).astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def scales_from_extremes(key_pair_max: np.ndarray, value_max: np.ndarray, key_gain: float = 1.0) -> tuple:
    """key_pair_max (KV, hd/2): a layer's largest key length per rotary pair; value_max (KV, hd): largest |value|;
    key_gain: how much louder than its own keys the layer's buffer may hold keys (rows_key_scale in row layers)
    -> (key scale, value scale), each (KV, hd) float32."""
    k = np.concatenate([key_pair_max, key_pair_max], axis=-1) * max(1.0, key_gain)
    floor = np.float32(1e-6)
    return (np.maximum(k, floor) / QMAX).astype(np.float32), (np.maximum(value_max, floor) / QMAX).astype(np.float32)
