"""Bounded attention state: S sink slots + a ring of the last W tokens (StreamingLLM), in NumPy.

This module does the bookkeeping: for the next T tokens of a stream that has already seen `n_past`
tokens it says where their keys go, which cached slots each new token may attend to, and the RoPE
positions to use; and it re-rotates the ring when its rotary frame moves. The graph (and the torch
reference) does the attention with them.

Keys are cached already rotated, so a decode step reads each cached key once and rotates none
(rotating the whole ring at every step cost SmolLM2 more memory traffic than its weights). Positions
stay bounded however long the stream runs: window keys are rotated in a frame f that moves by W
every W tokens once the window is full,

  f(n) = W * floor(max(0, n - (S + W - 1)) / W)          frame after n tokens
  token a, seen or stored          rotary position a - f(n_past)       (window distances a - b exact)
  on a frame move f -> f'          every ring key is rotated by f - f'  (once per W tokens)
  sink s                           stored at position s, never moved; a query at a reads the sinks as
                                   if it sat at min(a, S + W - 1): sink distance min(a - s, S + W - 1 - s)
                                   (true until the window fills, then as if the sinks sat just before it)
  largest position used            S + 2W + T - 3

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
    q_pos: np.ndarray  # (T,) int64: rotary position of each new token (queries and the keys it stores)
    sink_q_pos: np.ndarray  # (T,) int64: position each new token's query takes against the sinks
    attn_mask: np.ndarray  # (T, S + W + T) float32
    slots: np.ndarray  # (T,) int64: cache slot each new token's key/value is written to


def slot_of(a: np.ndarray | int, sinks: int, window: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    return np.where(a < sinks, a, sinks + (a - sinks) % window)


def frame(n: int, sinks: int, window: int) -> int:
    """Rotary frame of the ring's keys after n tokens (see the module docstring)."""
    return max(0, n - (sinks + window - 1)) // window * window


def max_position(sinks: int, window: int) -> int:
    """The largest rotary position any step uses: S + 2W + T - 3 (module docstring) with T <= W (plan_step).
    The exported graph's RoPE tables stop here (lm.py ropes_at)."""
    return sinks + 3 * window - 3


def plan_step(n_past: int, t: int, sinks: int, window: int) -> StepPlan:
    if t < 1 or t > window:
        raise ValueError(f"a step takes 1..{window} tokens, got {t}")
    if t == 1 and n_past >= sinks:
        return _decode_plan(n_past, sinks, window)
    return _plan(n_past, t, sinks, window)


def _decode_plan(n: int, sinks: int, window: int) -> StepPlan:
    """plan_step(n, 1) once the sinks are in: every sink visible; every ring slot holding a token visible
    but the one the new token is about to replace (it holds token n - W, just out of reach), or, while the
    ring fills, the slots from the new token's on hold nothing. What _plan computes, in a few NumPy calls
    instead of ~20 over W-long arrays (SmolLM2, decode after the graph has flushed the caches: 0.11 ->
    0.02 ms a token)."""
    m = n - sinks  # ring tokens seen
    mask = np.zeros((1, sinks + window + 1), dtype=np.float32)
    if m < window:
        mask[0, sinks + m:sinks + window] = NEG_INF
    else:
        mask[0, sinks + m % window] = NEG_INF
    return StepPlan(q_pos=np.array([n - frame(n, sinks, window)], np.int64),
                    sink_q_pos=np.array([min(n, sinks + window - 1)], np.int64), attn_mask=mask,
                    slots=np.array([sinks + m % window], np.int64))


def _plan(n_past: int, t: int, sinks: int, window: int) -> StepPlan:
    S, W = sinks, window
    a = n_past + np.arange(t, dtype=np.int64)  # (T,) absolute index of each new token
    q_pos = a - frame(n_past, S, W)
    sink_q_pos = np.minimum(a, S + W - 1)

    # the token held by each ring slot j: the latest b >= S with (b - S) % W == j and b < n_past
    m = n_past - S  # window tokens seen so far
    j = np.arange(W, dtype=np.int64)
    held = m - 1 - j >= 0
    b = S + j + W * np.floor_divide(np.maximum(m - 1 - j, 0), W)  # (W,)

    mask = np.full((t, S + W + t), NEG_INF, dtype=np.float32)
    mask[:, :S][:, np.arange(S) < n_past] = 0.0  # (T, S) a sink is visible once it exists
    win_ok = held[None, :] & (a[:, None] - b[None, :] < W)  # (T, W)
    mask[:, S:S + W][win_ok] = 0.0
    u = np.arange(t)
    new_ok = (u[None, :] <= u[:, None]) & ((a[None, :] < S) | (a[:, None] - a[None, :] < W))  # (T, T)
    mask[:, S + W:][new_ok] = 0.0
    return StepPlan(q_pos=q_pos, sink_q_pos=sink_q_pos, attn_mask=mask, slots=slot_of(a, S, W))


def rope_angles(delta: int, head_dim: int, theta: float, divisors: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (hd,) of a rotation by `delta` positions, in HF's [f, f] layout, computed in float64.
    divisors: RoPE scaling (config.rope_inv_freq)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if divisors:
        inv = inv / np.asarray(divisors, dtype=np.float64)
    ang = np.concatenate([delta * inv, delta * inv])
    return np.cos(ang), np.sin(ang)


def rotate(x: np.ndarray, delta: int, theta: float, divisors: tuple = ()) -> np.ndarray:
    """RoPE rotation of x (..., hd) by `delta` positions (rotations compose: R_a R_b = R_{a+b})."""
    cos, sin = rope_angles(delta, x.shape[-1], theta, divisors)
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return (x * cos + rot * sin).astype(x.dtype)


def frame_shift(n_before: int, n_after: int, sinks: int, window: int) -> int:
    """How far the frame moved while the stream went from n_before to n_after tokens (0 mostly)."""
    return frame(n_after, sinks, window) - frame(n_before, sinks, window)


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
