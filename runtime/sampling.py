"""Token sampling in NumPy: greedy, temperature, top-k, top-p, seeded. Knows nothing of the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 40  # keep the k most likely tokens (0 = all)
    top_p: float = 0.95  # keep the smallest set whose probability reaches p (1 = all)
    seed: int | None = None  # None: a fresh random stream
    repeat_penalty: float = 1.0  # llama.cpp's: logits of the last repeat_last_n tokens divided (if > 0) or
    #                              multiplied (if < 0) by it; 1 = off
    repeat_last_n: int = 64  # how many of the latest tokens (this turn's prompt and answer) it looks at

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not (np.isfinite(self.repeat_penalty) and 0 < self.repeat_penalty <= 10):
            raise ValueError(f"repeat-penalty must be in (0, 10], got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat-last-n must be >= 0, got {self.repeat_last_n}")


def penalize(logits: np.ndarray, recent, penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty over the distinct tokens in recent: a copy of logits."""
    if penalty == 1.0 or not len(recent):
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def sample(logits: np.ndarray, cfg: Sampling, rng: np.random.Generator) -> int:
    logits = np.asarray(logits)
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    if 0 < cfg.top_k < logits.size:  # work on the k candidates only (a 49k-vocab sort costs ~1 ms)
        cand = np.argpartition(logits, -cfg.top_k)[-cfg.top_k:]
    else:
        cand = np.arange(logits.size)
    x = logits[cand].astype(np.float64) / cfg.temperature
    p = np.exp(x - np.max(x))
    p /= p.sum()
    if cfg.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, cfg.top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(cand[rng.choice(p.size, p=p)])
