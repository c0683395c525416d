"""Bounded attention state: one buffer per layer holding [R rows | S sinks | the recent tokens], in NumPy.

This module does the bookkeeping: for the next T tokens of a stream that has already seen `n_past` tokens it
says where their keys go, which buffer rows each new token may attend to, and the RoPE positions to use. The
graph's attention (onnxruntime's GroupQueryAttention, and the torch reference) writes the new keys and values
into the buffer in place and attends over its first `total` rows; the runtime moves the buffer's contents
only at chunk starts (prepare_chunk below).

Buffer layout (per layer), the same in every layer:

  index   0 .. R-1        the row level's rows (runtime/rows.py; masked in layers without rows)
          R .. R+S-1      the sinks: token a < S at R + a
          R+S ..          the linear region: token a >= S at R + S + (a - S - base), base a multiple of D
  length  R + S + W + C + D - 2 (`Layout.capacity`): at a chunk start c0 the region holds every token a query
          of the chunk can see (a - b < W) and the chunk itself

GroupQueryAttention writes the T new tokens at rows total - T .. total - 1 and reads rows 0 .. total - 1, so the
new tokens always extend the region; visibility (the window of exactly W, causality in a chunk, the sinks, the
rows) is an additive bias.

Positions. Keys are stored rotated, so a decode step reads each key once and rotates none. Window keys are
rotated in a frame fr that moves by W at chunk starts, keeping positions bounded however long the stream runs:

  base(c0) = D * floor(max(0, c0 - W + 1 - S) / D)     first region token's offset, for the chunk at c0
  fr(c0)   = W * floor(base(c0) / W)                     rotary frame
  token a of the chunk at c0       rotary position a - fr(c0)   (window distances a - b exact)
  on a frame move fr -> fr'        the region's keys are rotated by fr - fr' (once per W tokens)
  sinks and rows                   held in the sinks' own frame (sink s at position s, the rows where
                                   rows.read_position puts them); a token a reads them from its sink position
                                   min(a, S + W - 1) (`sink_pos`): sink s min(a - s, S + W - 1 - s) back.
                                   The exact attention (chunks) rotates its queries twice, to a's position
                                   and to its sink position. GroupQueryAttention (decode) rotates once, so
                                   for a decode step the runtime writes the sinks and rows rotated by
                                   sink_delta(a) into the buffer first: the same distances.
  largest position used            S + W + C + D - 3 + W (`max_position`)

Chunks (C tokens, the memory's write period) are also the unit of everything that moves: pieces never cross
a chunk, so feeding a chunk whole or token by token gives the same positions, masks and state.
What this leaves out: the tensors themselves (runtime/engine.py owns them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG_INF = np.float32(-1e9)  # additive mask value; exp() of it is exactly 0 in fp32


@dataclass(frozen=True)
class Layout:
    rows: int  # R: the row level's slots (0 without one)
    sinks: int  # S
    window: int  # W
    chunk: int  # C: the memory's write period; pieces never cross a chunk
    shift: int  # D: the region moves by D rows at a time

    @classmethod
    def of(cls, cfg) -> Layout:
        """The layout of a ModelConfig: D = min(W, 4C) (a move of ~W rows every D tokens: 4C keeps the buffer
        within ~25 % of W beyond the window on SmolLM2, and moves 16 times per 1,024 tokens)."""
        return cls(cfg.cms.rows, cfg.sinks, cfg.window, cfg.cms.chunk, min(cfg.window, 4 * cfg.cms.chunk))

    @property
    def capacity(self) -> int:
        return self.rows + self.sinks + self.window + self.chunk + self.shift - 2

    def base(self, c0: int) -> int:
        return self.shift * (max(0, c0 - self.window + 1 - self.sinks) // self.shift)

    def frame(self, c0: int) -> int:
        return self.window * (self.base(c0) // self.window)

    def index(self, a, c0: int) -> np.ndarray:
        """Buffer row of token a (a in the chunk at c0 or before it and still held)."""
        a = np.asarray(a, dtype=np.int64)
        return np.where(a < self.sinks, self.rows + a, self.rows + a - self.base(c0))

    def sink_delta(self, a: int) -> int:
        """Rotation from the sinks' own frame (sink s at position s, the query at min(a, S + W - 1)) to token
        a's frame (its chunk's): a decode step at a reads the sinks and rows rotated by this."""
        return a - self.frame(chunk_start(a, self.chunk)) - min(a, self.sinks + self.window - 1)

    @property
    def max_position(self) -> int:
        """The largest rotary position a new token takes (the graph's RoPE tables stop here)."""
        return self.sinks + 2 * self.window + self.chunk + self.shift - 3


def chunk_start(n: int, chunk: int) -> int:
    return n - n % chunk


@dataclass(frozen=True)
class StepPlan:
    q_pos: np.ndarray  # (1, T) int64: rotary position of each new token (queries and the keys it stores)
    sink_pos: np.ndarray  # (1, T) int64: each new token's position against the sinks and rows (their frame)
    total: int  # buffer rows in use once the new tokens are written (they go to total - T .. total - 1)
    bias: np.ndarray  # (1, 1, T, total) float32: additive, rows masked (layers without the row level)
    row_bias: np.ndarray | None  # (1, 1, T, total) float32: the same with the row level's visibility, or None


def plan_step(n_past: int, t: int, lay: Layout, row_mask: np.ndarray | None = None) -> StepPlan:
    """The next t tokens (within one chunk). row_mask (t, R): the row level's visibility (rows.mask), or None."""
    S, W, C, R = lay.sinks, lay.window, lay.chunk, lay.rows
    if t < 1 or (n_past % C) + t > C:
        raise ValueError(f"a step takes 1..{C - n_past % C} tokens at {n_past}, got {t}")
    c0 = chunk_start(n_past, C)
    a = n_past + np.arange(t, dtype=np.int64)  # (T,) absolute index of each new token
    total = int(lay.index(n_past + t - 1, c0)) + 1
    bias = np.full((1, 1, t, total), NEG_INF, dtype=np.float32)
    if t == 1:  # a decode step: the sinks that exist and one contiguous run of rows (a few slices, no masks)
        bias[0, 0, 0, R:R + min(S, n_past + 1)] = 0.0
        first = max(S, n_past - W + 1)
        if first <= n_past:
            bias[0, 0, 0, int(lay.index(first, c0)):total] = 0.0
    else:
        b_idx = np.arange(R, total)  # buffer rows of the sinks and the region
        b = np.where(b_idx < R + S, b_idx - R, b_idx - R + lay.base(c0))  # (total - R,) token held by each row
        ok = (b[None, :] <= a[:, None]) & ((b[None, :] < S) | (a[:, None] - b[None, :] < W))
        bias[0, 0, :, R:][ok] = 0.0
    row_bias = None
    if row_mask is not None:
        row_bias = bias.copy()
        row_bias[0, 0, :, :R] = row_mask
    return StepPlan(q_pos=(a - lay.frame(c0))[None], sink_pos=np.minimum(a, S + W - 1)[None], total=total,
                    bias=bias, row_bias=row_bias)


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
    return rotate_pair(x, rotate_half(x), *rope_angles(delta, x.shape[-1], theta, divisors)).astype(x.dtype)


def split_pieces(n_past: int, n_new: int, chunk: int) -> list[int]:
    """Piece lengths for feeding n_new tokens so that no piece crosses a chunk boundary."""
    pieces = []
    pos = n_past
    left = n_new
    while left > 0:
        take = min(left, chunk - pos % chunk)
        pieces.append(take)
        pos += take
        left -= take
    return pieces


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[-x2, x1] of x = [x1, x2] (..., hd): RoPE's partner, linear in x and the same at every distance."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rotate_pair(x: np.ndarray, x_half: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x cos + rotate_half(x) sin, given rotate_half(x) and the angles (hd,): two products and a sum over contiguous
    arrays, no BLAS (whose threads would contend with onnxruntime's). The runtime rotates the sinks and rows this
    way before every decode step, their rotate_half kept while they do not change."""
    out = np.multiply(x, cos)
    out += x_half * sin
    return out
