"""Storage codecs for the CMS state between steps: fp32 | fp16 | int8 with one scale per slot (row).

NumPy only; runs on the Pi. Like llama2.c's quantize_q80, `encode` also returns its own worst
error so callers can report it. The jump map always computes in fp32 (FP16 *compute* is slow on
the A76 through onnxruntime); these formats are storage only.
What this leaves out: weight quantization (quantize/weights.py, workstation side).
"""

from __future__ import annotations

import numpy as np

from cortex_edge.contract import STATE_FORMATS

INT8_MAX = 127.0


def encode(x: np.ndarray, fmt: str) -> tuple[dict[str, np.ndarray], float]:
    """x (N, d) float32 -> ({"q": ..., ["scale": (N,) float32]}, max abs round-trip error)"""
    x = np.asarray(x, dtype=np.float32)
    if fmt == "fp32":
        return {"q": x.copy()}, 0.0
    if fmt == "fp16":
        q = x.astype(np.float16)
        return {"q": q}, float(np.max(np.abs(q.astype(np.float32) - x), initial=0.0))
    if fmt == "int8":
        absmax = np.max(np.abs(x), axis=-1)  # (N,)
        scale = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(np.float32)
        q = np.clip(np.rint(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
        enc = {"q": q, "scale": scale}
        return enc, float(np.max(np.abs(decode(enc, fmt) - x), initial=0.0))
    raise ValueError(f"unknown state format {fmt!r}; expected one of {STATE_FORMATS}")


def decode(enc: dict[str, np.ndarray], fmt: str) -> np.ndarray:
    if fmt in ("fp32", "fp16"):
        return enc["q"].astype(np.float32)
    if fmt == "int8":
        return enc["q"].astype(np.float32) * enc["scale"][..., None]
    raise ValueError(f"unknown state format {fmt!r}; expected one of {STATE_FORMATS}")


def nbytes(enc: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in enc.values()))

