"""The row level of the CMS in NumPy: key/value rows of chosen tokens for the upper layers' attention.

A frozen model copies from attention rows it computed itself (docs/memory.md measured it: a fact's own rows
offered to layers 15-29 recover 94 % of what SmolLM2 does with the fact in its window). So this level stores
tokens' rows, not a learnt summary, and the only thing it learns is which tokens to keep.

  every token t       g_t = sigmoid(w_g . tanh(W_z f_t + b_z) + b_g)       f_t: the graph's write_feat
                      kept as pending until the event after its chunk's
  at each event       for the previous chunk's tokens in order:            (the jump map of one CMS level:
                        s_t = max(g_t .. g_t+L)  (L = rows_lookahead)           LRU addressing, the delta rule
                        if s_t > tau:  j = argmin u  (LRU by usage; empty slots have u = 0)   with a binary
                        if u_j < s_t:  u <- (1 - d) u;  u_j <- s_t              gate, the decay on the usage)
                                       K_j, V_j <- the token's rows
  read, every token   layers rows_from.. attend to [rows | sinks | recent tokens] (the buffer of ring.py): slot
                      j's key is stored rotated at P_j = S + W - 1 - (R - j), and seen from the sinks' query
                      position, so a row sits at distance R - j (recent, as the measurement wants); with rows_place
                      "recency" the views rotate it on so that the k-th newest held row sits at distance
                      rows_gap + k + 1 (a statement's tokens in order, as if just said); the engine writes the views
                      into the buffer, in their own frame for a chunk and rotated to the token's frame for a
                      decode step (engine.place): every token reads them at exactly those distances; a row is masked while its token is still in the window (the model sees
                      each token once, and a history that fits the window computes exactly what the model alone
                      computes)

Writes wait for the event so that feeding a chunk whole or token by token gives the same state (pieces never
cross an event), and one event more so that the lookahead can see the next chunk's first gates: a gate fires
once a sentence shows itself a fact ("... is the name of my cat"), L tokens after a value that came first
("Pixel is ..."). The rows of the previous chunk's tokens are still in the buffer at the event (2C <= W): they
are taken from there, and no row is due to be read before it is written (a row is read W tokens after its own). Storage: slot-major (R, layers, KV, hd) for keys and values, so that int8 has one scale per slot,
layer and head, and a write re-encodes only its own slot. The torch reference is cortex_edge/model/cms.py
(RowWriter); tests hold the two together.
What this leaves out: the attention itself (the graph), sessions (session.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cortex_edge import contract
from cortex_edge.config import ModelConfig
from cortex_edge.quantize import kv_cache, state_codec
from cortex_edge.runtime import ring
from cortex_edge.runtime.cms import sigmoid
from cortex_edge.runtime.ring import NEG_INF


def gate_param_shapes(event_dim: int) -> dict[str, tuple[int, ...]]:
    return {contract.ROWS_Z_WEIGHT: (event_dim, event_dim), contract.ROWS_Z_BIAS: (event_dim,),
            contract.ROWS_GATE_WEIGHT: (1, event_dim), contract.ROWS_GATE_BIAS: (1,)}


def gates(feat: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """feat (T, d_z) -> g (T,) in (0, 1)"""
    z = np.tanh(feat @ w[contract.ROWS_Z_WEIGHT].T + w[contract.ROWS_Z_BIAS])
    x = (z @ w[contract.ROWS_GATE_WEIGHT].T)[:, 0] + w[contract.ROWS_GATE_BIAS][0]
    return sigmoid(x).astype(np.float32)


def row_position(j: int | np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Rotary position slot j's key is stored at: distance R - j before the sinks' query position S + W - 1."""
    return cfg.sinks + cfg.window - 1 - (cfg.cms.rows - np.asarray(j))


def read_position(token: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """(R,) rotary position each slot's key is read at. rows_place "slot": where it is stored (row_position).
    "recency": the held rows in token order, the k-th newest at distance rows_gap + k + 1 from the sinks' query position
    (a fact's statement then reads as its own tokens, in order, just said); empty slots stay where they are."""
    R = cfg.cms.rows
    pos = row_position(np.arange(R), cfg)
    if cfg.cms.rows_place == "recency":
        held = np.flatnonzero(token >= 0)
        newest_first = held[np.argsort(-token[held], kind="stable")]
        pos[newest_first] = cfg.sinks + cfg.window - 2 - cfg.cms.rows_gap - np.arange(held.size)
    return pos


def mask(token: np.ndarray, a: np.ndarray, window: int, bias: float = 0.0) -> np.ndarray:
    """(T, R) additive mask: slot j visible to the query of token a once its token has left the window, its logit
    raised by `bias` (config.rows_bias)."""
    return np.where((token[None, :] >= 0) & (a[:, None] - token[None, :] >= window), np.float32(bias),
                    NEG_INF).astype(np.float32)


@dataclass
class RowState:
    keys: dict[str, np.ndarray]  # encoded (R * Lr * KV, hd): slot-major
    values: dict[str, np.ndarray]  # encoded (R * Lr * KV, hd)
    usage: np.ndarray  # (R,) float32, 0 = empty
    token: np.ndarray  # (R,) int64, absolute index of the token held, -1 = empty
    pending: np.ndarray  # (2C,) float32: gates of the previous and the current chunk's tokens (not yet written)


def empty(cfg: ModelConfig, fmt: str) -> RowState:
    c = cfg.cms
    lr = len(c.row_layers(cfg.n_layers))
    z = np.zeros((c.rows * lr * cfg.n_kv_heads, cfg.head_dim), np.float32)
    return RowState(keys=state_codec.encode(z, fmt)[0], values=state_codec.encode(z, fmt)[0],
                    usage=np.zeros(c.rows, np.float32), token=np.full(c.rows, -1, np.int64),
                    pending=np.zeros(2 * c.chunk, np.float32))


def views(rs: RowState, cfg: ModelConfig, fmt: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """fp32, per row layer: keys (KV, R, hd) rotated where they are read, in the sinks' own frame (the engine
    rotates them on into each chunk's frame) and times rows_key_scale, and values (KV, R, hd)."""
    c = cfg.cms
    lr, KV, hd = len(c.row_layers(cfg.n_layers)), cfg.n_kv_heads, cfg.head_dim
    k = state_codec.decode(rs.keys, fmt).reshape(c.rows, lr, KV, hd)
    v = state_codec.decode(rs.values, fmt).reshape(c.rows, lr, KV, hd)
    move = read_position(rs.token, cfg) - row_position(np.arange(c.rows), cfg)
    if np.any(move):  # keys are stored rotated at their slot's position: rotated on to where they are read
        k = k.copy()
        for j in np.flatnonzero(move):
            k[j] = ring.rotate(k[j], int(move[j]), cfg.rope_theta, cfg.rope_freq_divisors)
    if c.rows_key_scale != 1.0:
        k = k * np.float32(c.rows_key_scale)
    return ([np.ascontiguousarray(k[:, i].transpose(1, 0, 2)) for i in range(lr)],
            [np.ascontiguousarray(v[:, i].transpose(1, 0, 2)) for i in range(lr)])


def _set_slot(enc: dict[str, np.ndarray], j: int, rows: np.ndarray, fmt: str) -> None:
    """Slot j's (Lr * KV, hd) block re-encoded alone (int8 scales are per slot, layer and head)."""
    n = rows.shape[0]
    e, _ = state_codec.encode(rows, fmt)
    for key, a in e.items():
        enc[key][j * n:(j + 1) * n] = a


def _row(bufs: list[np.ndarray], i: int, slot: int, kv_scales: list | None, which: int) -> np.ndarray:
    """Buffer row `slot` of layer i (KV, hd) as fp32."""
    x = bufs[i][0, :, slot]
    return x if kv_scales is None else kv_cache.dequantize(x, kv_scales[i][which][:, 0])


def event(rs: RowState, buf_keys: list[np.ndarray], buf_values: list[np.ndarray], n: int, cfg: ModelConfig,
          fmt: str, kv_scales: list | None = None) -> list[tuple[int, int, float]]:
    """At the event that ends the chunk before token n: commit the chunk before it, its tokens whose gate or one of
    the next L tokens' gates passes tau taking the weakest slots. buf_keys[i], buf_values[i] (1, KV, M, hd): every
    layer's buffer as the chunk that just ended left it (ring.py), keys rotated in its frame; kv_scales: an 8-bit
    cache's [(key scale, value scale) (KV, 1, hd)] a layer (engine.load_kv_scales), None for fp32 buffers.
    Returns the writes (token, slot, strength)."""
    c = cfg.cms
    S, C, L = cfg.sinks, c.chunk, c.rows_lookahead
    layers = list(c.row_layers(cfg.n_layers))
    lay = ring.Layout.of(cfg)
    f = lay.frame(n - C)
    writes = []
    for t in range(C):
        a = n - 2 * C + t
        g = float(np.max(rs.pending[t:t + L + 1]))
        if a < S or not g > c.rows_threshold:
            continue
        j = int(np.argmin(rs.usage))
        if not rs.usage[j] < g:
            continue
        slot = int(lay.index(a, n - C))
        delta = int(row_position(j, cfg)) - (a - f)
        k = np.stack([ring.rotate(_row(buf_keys, i, slot, kv_scales, 0), delta, cfg.rope_theta,
                                  cfg.rope_freq_divisors) for i in layers])  # (Lr, KV, hd)
        v = np.stack([_row(buf_values, i, slot, kv_scales, 1) for i in layers])  # (Lr, KV, hd)
        _set_slot(rs.keys, j, k.reshape(-1, cfg.head_dim), fmt)
        _set_slot(rs.values, j, v.reshape(-1, cfg.head_dim), fmt)
        rs.usage *= np.float32(1.0 - c.rows_decay)
        rs.usage[j] = np.float32(g)
        rs.token[j] = a
        writes.append((a, j, g))
    rs.pending[:C] = rs.pending[C:]
    rs.pending[C:] = 0.0
    return writes
