"""The CMS jump map in NumPy: what the runtime steps at every memory event (every C tokens).

The torch reference is cortex_edge/model/cms.py (CMSWriter.event_step); tests hold the two
together on output and state over a grid of configurations. The read that happens every token
runs inside the ONNX graph; `read` here is the same maths, used for upward consolidation.

One event, given the chunk summary s (mean of the graph's write_feat over the chunk):

      s ──► q_w = W_q s ───────────────┐
      │                                ▼
      │            level l-1 ──read──► c_below          (l > 0 only: upward consolidation)
      │                                │
      └──────────► [s ; c_below] ──► z = tanh(W_z x + b_z)
                                        ├─► g = sigmoid(w_g·z + b_g)            write gate
                                        │   g ← max(g - τ, 0) / (1 - τ)          sparse write (τ = write_threshold)
                                        ├─► v = W_v z,  k = W_k z               value, key
                                        ├─► d = d_l or d_min + (d_max-d_min)·sigmoid(w_d·z + b_d)
                                        └─► a = content | lru | hybrid           address, ||a||_2 <= 1
      M_l ← (1-d) M_l + g a ⊗ v            (delta rule: + g a ⊗ (v - aᵀ(1-d)M_l))
      K_l ← (1-d) K_l + g a ⊗ k            (same form)
      u_l ← (1-d) u_l + [g > 0] a          (usage, for LRU: only events that write move it)

Level l steps only on events e with e % write_every[l] == 0; levels go bottom-up, so level l
consolidates what level l-1 holds after this event's write. Everything is fp32; storage
formats (fp16, int8) are applied by the caller (runtime/state.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cortex_edge import contract
from cortex_edge.config import CMSConfig


@dataclass
class Level:
    mem: np.ndarray  # (N, d) float32
    keys: np.ndarray  # (N, d_k) float32
    usage: np.ndarray  # (N,) float32


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def read(mem: np.ndarray, keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """c = softmax(K q / sqrt(d_k))ᵀ M  -> (d,)"""
    att = softmax(keys @ q / np.sqrt(np.float32(keys.shape[1])))  # (N,)
    return att @ mem  # (d,)


def address(keys: np.ndarray, usage: np.ndarray, k: np.ndarray, cfg: CMSConfig) -> np.ndarray:
    """Write weights over slots, (N,), each of L2 norm <= 1."""
    content = softmax(keys @ k / np.sqrt(np.float32(keys.shape[1])))
    if cfg.addressing == "content":
        return content
    lru = np.zeros_like(usage)
    lru[int(np.argmin(usage))] = 1.0
    if cfg.addressing == "lru":
        return lru
    return cfg.hybrid_mix * content + (1.0 - cfg.hybrid_mix) * lru


def sparse_gate(g: float, threshold: float) -> float:
    """The note's sparse write (section 9.2) made continuous: gates below the threshold write nothing."""
    return max(g - threshold, 0.0) / (1.0 - threshold) if threshold > 0 else g


def apply_write(lv: Level, a: np.ndarray, g: float, v: np.ndarray, k: np.ndarray, d: float,
                delta_rule: bool) -> Level:
    """The jump map proper: decay, gated write at address a. Returns a new Level."""
    keep = np.float32(1.0 - d)
    mem = keep * lv.mem  # (N, d)
    keys = keep * lv.keys  # (N, d_k)
    if delta_rule:
        v = v - a @ mem  # (d,)  erase what the address holds
        k = k - a @ keys
    mem = mem + np.float32(g) * np.outer(a, v)
    keys = keys + np.float32(g) * np.outer(a, k)
    usage = keep * lv.usage + (a if g > 0 else 0.0)
    return Level(mem.astype(np.float32), keys.astype(np.float32), usage.astype(np.float32))


def event_step(levels: list[Level], s: np.ndarray, event: int, w: dict[str, np.ndarray],
               cfg: CMSConfig) -> tuple[list[Level], dict[str, list[float]]]:
    """One memory event. levels: current state; s: (d_z,) chunk summary; event: 1-based index."""
    s = s.astype(np.float32)
    q_w = w[contract.WRITE_QUERY] @ s  # (d_k,)
    out = list(levels)
    info: dict[str, list[float]] = {"gate": [], "decay": []}
    for lvl in range(cfg.levels):
        if event % cfg.write_every[lvl]:
            info["gate"].append(float("nan"))
            info["decay"].append(float("nan"))
            continue

        def p(name: str) -> np.ndarray:
            return w[contract.write_param(lvl, name)]

        x = s if lvl == 0 else np.concatenate([s, read(out[lvl - 1].mem, out[lvl - 1].keys, q_w)])
        z = np.tanh(p("z.weight") @ x + p("z.bias"))  # (d_z,)
        g = sparse_gate(float(sigmoid(p("gate.weight") @ z + p("gate.bias"))[0]), cfg.write_threshold)
        v = p("value.weight") @ z  # (d_l,)
        k = p("key.weight") @ z  # (d_k,)
        if cfg.adaptive_decay:
            d = cfg.decay_min + (cfg.decay_max - cfg.decay_min) * float(
                sigmoid(p("decay.weight") @ z + p("decay.bias"))[0])
        else:
            d = cfg.decay[lvl]
        a = address(out[lvl].keys, out[lvl].usage, k, cfg)
        out[lvl] = apply_write(out[lvl], a.astype(np.float32), g, v, k, d, cfg.delta_rule)
        info["gate"].append(g)
        info["decay"].append(d)
    return out, info


def write_param_shapes(cfg: CMSConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every jump-map weight (the keys of contract.CMS_WRITE_WEIGHTS)."""
    shapes = {contract.WRITE_QUERY: (cfg.key_dim, cfg.event_dim)}
    for lvl in range(cfg.levels):
        din = cfg.event_dim + (cfg.widths[lvl - 1] if lvl else 0)
        for name, shp in {"z.weight": (cfg.event_dim, din), "z.bias": (cfg.event_dim,),
                          "gate.weight": (1, cfg.event_dim), "gate.bias": (1,),
                          "value.weight": (cfg.widths[lvl], cfg.event_dim), "key.weight": (cfg.key_dim, cfg.event_dim),
                          "decay.weight": (1, cfg.event_dim), "decay.bias": (1,)}.items():
            shapes[contract.write_param(lvl, name)] = shp
    return shapes


def random_write_weights(cfg: CMSConfig, seed: int) -> dict[str, np.ndarray]:
    """Random jump-map weights scaled by fan-in (benchmarks and tests of the jump map alone)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) / np.sqrt(s[-1] if len(s) > 1 else 1)).astype(np.float32)
            for k, s in write_param_shapes(cfg).items()}


def empty_levels(cfg: CMSConfig) -> list[Level]:
    return [Level(np.zeros((n, d), np.float32), np.zeros((n, cfg.key_dim), np.float32), np.zeros(n, np.float32))
            for n, d in zip(cfg.slots, cfg.widths)]


def value_bound(w: dict[str, np.ndarray], cfg: CMSConfig) -> list[float]:
    """V_max per level: ||v|| = ||W_v z|| <= ||W_v||_2 ||z||_2 <= ||W_v||_2 sqrt(d_z)  (z = tanh)."""
    return [float(np.linalg.norm(w[contract.write_param(lvl, "value.weight")], 2) * np.sqrt(cfg.event_dim))
            for lvl in range(cfg.levels)]


def norm_bound(m0_norm: float, v_max: float, d_min: float) -> float:
    """||M_t||_F <= max(||M_0||_F, V_max / d) for g <= 1, ||a||_2 <= 1 (triangle inequality)."""
    return max(m0_norm, v_max / d_min)
