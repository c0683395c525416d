"""Bounded attention state: S sink slots + a ring of the last W tokens (StreamingLLM), in NumPy.

This module only does bookkeeping: for the next T tokens of a stream that has already seen
`n_past` tokens it says where their keys go, which cached slots each new token may attend to,
and the RoPE positions to use. The graph (and the torch reference) does the maths with them.

Positions stay bounded however long the stream runs. Keys are cached un-rotated and rotated
at read time with positions relative to an offset o = max(0, n_past - (S + W - 1)):

  token a (absolute)          rotary position a - o          (so every window distance a - b is exact)
  sink s seen from token a    distance min(a - s, S + W - 1 - s)   (true distance until the window fills,
                                                                     then as if the sinks sat just before it)
  largest position used       S + W + T - 2

Cache layout (per layer):   [ sink 0 .. sink S-1 | ring slot 0 .. ring slot W-1 ]
token a lives in slot a if a < S, else S + (a - S) mod W.
What this leaves out: the tensors themselves (runtime/engine.py owns them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG_INF = np.float32(-1e9)  # additive mask value; exp() of it is exactly 0 in fp32


@dataclass(frozen=True)
class StepPlan:
    q_pos: np.ndarray  # (T,) int64
    win_pos: np.ndarray  # (W,) int64
    sink_pos: np.ndarray  # (T, S) int64
    attn_mask: np.ndarray  # (T, S + W + T) float32
    slots: np.ndarray  # (T,) int64: cache slot each new token's key/value is written to


def slot_of(a: np.ndarray | int, sinks: int, window: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    return np.where(a < sinks, a, sinks + (a - sinks) % window)


def plan_step(n_past: int, t: int, sinks: int, window: int) -> StepPlan:
    if t < 1 or t > window:
        raise ValueError(f"a step takes 1..{window} tokens, got {t}")
    S, W = sinks, window
    a = n_past + np.arange(t, dtype=np.int64)  # (T,) absolute index of each new token
    o = max(0, n_past - (S + W - 1))
    q_pos = a - o

    # the token held by each ring slot j: the latest b >= S with (b - S) % W == j and b < n_past
    m = n_past - S  # window tokens seen so far
    j = np.arange(W, dtype=np.int64)
    held = m - 1 - j >= 0
    b = S + j + W * np.floor_divide(np.maximum(m - 1 - j, 0), W)  # (W,)
    win_pos = np.where(held, b - o, 0)

    # sink s seen from token a_i
    s = np.arange(S, dtype=np.int64)
    dist = np.minimum(a[:, None] - s[None, :], (S + W - 1) - s[None, :])  # (T, S)
    sink_pos = q_pos[:, None] - dist

    mask = np.full((t, S + W + t), NEG_INF, dtype=np.float32)
    mask[:, :S][:, s < n_past] = 0.0  # (T, S) a sink is visible once it exists
    win_ok = held[None, :] & (a[:, None] - b[None, :] < W)  # (T, W)
    mask[:, S:S + W][win_ok] = 0.0
    u = np.arange(t)
    new_ok = (u[None, :] <= u[:, None]) & ((a[None, :] < S) | (a[:, None] - a[None, :] < W))  # (T, T)
    mask[:, S + W:][new_ok] = 0.0
    return StepPlan(q_pos=q_pos, win_pos=win_pos.astype(np.int64), sink_pos=sink_pos.astype(np.int64),
                    attn_mask=mask, slots=slot_of(a, S, W))


def split_pieces(n_past: int, n_new: int, chunk: int) -> list[int]:
    """Piece lengths for feeding n_new tokens so that no piece crosses a memory-event boundary."""
    pieces = []
    pos = n_past
    left = n_new
    while left > 0:
        take = min(left, chunk - pos % chunk)
        pieces.append(take)
        pos += take
        left -= take
    return pieces
