"""The runtime engine: holds the state, runs the ONNX graphs, steps the CMS jump map in NumPy.

NumPy + onnxruntime only. One token's path:

   token ─► plan (ring.py: slots, positions, mask) ─► ONNX graph ─► logits ─► sampler
                                                        │  ▲
                               new K/V rows ◄───────────┘  │ mem.{l}, mem_key.{l}: fp32 views of the stored state
                               write_feat ─► acc += feat    │
   every C tokens: s = acc / C ─► jump map (cms.py) on decode(stored) ─► encode ─► stored ─► fresh fp32 views

State (all of it bounded, whatever the history length):
   kv      per layer: keys (1, KV, P, hd), values (1, KV, hd, P) fp32   the attention ring with sinks (keys
                                                          rotated, ring.py; values transposed, lm.py Attention);
                                                          P = S + W, fewer while the ring fills (fit_ring)
   cms     per level: memory (N_l, d_l), keys (N_l, d_k) in the bundle's state format; usage (N_l,) fp32
   acc     (d_z,) fp32   sum of write_feat over the current chunk
   n, events             tokens seen, memory events done
What this leaves out: tokenization, sampling, sessions on disk (session.py).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from cortex_edge import contract
from cortex_edge.config import ModelConfig
from cortex_edge.quantize import state_codec
from cortex_edge.runtime import cms, ring
from cortex_edge.runtime import rows as rows_mod
from cortex_edge.runtime.bundle import Bundle
from cortex_edge.runtime.errors import BundleError


@dataclass
class StoredLevel:
    mem: dict[str, np.ndarray]  # encoded (N, d)
    keys: dict[str, np.ndarray]  # encoded (N, d_k)
    usage: np.ndarray  # (N,) float32


@dataclass
class State:
    keys: list[np.ndarray]
    values: list[np.ndarray]
    levels: list[StoredLevel]
    acc: np.ndarray
    n: int = 0
    events: int = 0
    views: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # derived fp32 (mem, keys)
    rows: rows_mod.RowState | None = None  # the row level (runtime/rows.py), when the model has one
    row_views: tuple[list[np.ndarray], list[np.ndarray]] | None = None  # derived fp32 graph inputs

    def copy(self) -> State:
        return copy.deepcopy(self)


class Engine:
    def __init__(self, bundle: Bundle, threads: int | None = None, state_format: str | None = None):
        """state_format: store the CMS state of new states in this format instead of the bundle's
        (evaluations compare fp32 / fp16 / int8 on one bundle; sessions keep the bundle's)."""
        self.bundle = bundle
        self.cfg: ModelConfig = bundle.config
        if state_format is not None and state_format not in contract.STATE_FORMATS:
            raise ValueError(f"unknown state format {state_format!r}; expected one of {contract.STATE_FORMATS}")
        self.state_format = state_format or bundle.state_format
        opts = session_options(threads)
        self.threads = opts.intra_op_num_threads
        try:
            self.sess = ort.InferenceSession(str(bundle.file(contract.GRAPH)), opts,
                                             providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad models
            raise BundleError(f"onnxruntime cannot load the bundle's graph: {str(e).splitlines()[0][:200]}") from None
        release_free_memory()
        self.write_w = load_write_weights(bundle)
        L, lv = self.cfg.n_layers, self.cfg.cms.levels
        self.row_layers = self.cfg.cms.row_layers(L)
        self._in = contract.input_names(L, lv, self.row_layers)
        self._out = contract.output_names(L)
        self._check_graph_shapes()

    def _check_graph_shapes(self) -> None:
        """The graphs must take exactly the contract's inputs, with the config's fixed sizes."""
        c = self.cfg
        want = {contract.past_key(0): [1, c.n_kv_heads, c.sinks + c.window, c.head_dim],
                contract.past_value(0): [1, c.n_kv_heads, c.head_dim, c.sinks + c.window]}
        for lvl, (n, d) in enumerate(zip(c.cms.slots, c.cms.widths)):
            want[contract.mem(lvl)] = [n, d]
            want[contract.mem_key(lvl)] = [n, c.cms.key_dim]
        for i in self.row_layers:
            want[contract.row_key(i)] = [1, c.n_kv_heads, c.cms.rows, c.head_dim]
            want[contract.row_value(i)] = [1, c.n_kv_heads, c.head_dim, c.cms.rows]
        got = {i.name: i.shape for i in self.sess.get_inputs()}
        if set(got) != set(self._in) or [o.name for o in self.sess.get_outputs()] != self._out:
            raise BundleError("bundle graph does not have the contract's inputs and outputs")
        # graphs that take fewer ring slots than S + W (a symbolic length) let a short history read a short ring
        self.grows = not isinstance(got[contract.past_key(0)][2], int)
        if self.grows:
            got[contract.past_key(0)] = [*got[contract.past_key(0)][:2], c.sinks + c.window, got[contract.past_key(0)][3]]
            got[contract.past_value(0)] = [*got[contract.past_value(0)][:3], c.sinks + c.window]
        for name, shape in want.items():
            if list(got[name]) != shape:
                raise BundleError(f"bundle graph input {name} has shape {got[name]}, the config says {shape}")

    # ------------------------------------------------------------------ state
    def ring_slots(self, n: int) -> int:
        """Cache slots (sinks + ring) the attention reads once n tokens are in: S + W in the steady state;
        while the ring is still filling (graphs with a symbolic length), the slots in use rounded up to W/8,
        so that a 512-token history reads 644 of SmolLM2's 1,028 slots and the arrays grow 8 times at most."""
        c = self.cfg
        full = c.sinks + c.window
        if not self.grows:
            return full
        step = max(1, c.window // RING_GROWTH)
        return min(full, c.sinks + step * max(1, -(-(n - c.sinks) // step)))

    def fit_ring(self, st: State, n: int | None = None) -> None:
        """Make st's K/V arrays ring_slots(n) long (n: tokens that will be in; default st.n).

        Each array is a view of the first KV * slots * hd floats of one S + W buffer, so growing moves the
        heads apart in place (slots fill in order: the kept ones are a prefix) and never frees or allocates:
        pages are touched, hence resident, only as the ring fills, and no freed blocks are left to the
        allocator (re-allocating at each growth left SmolLM2 ~50 MB of RSS that was never given back)."""
        want = self.ring_slots(st.n if n is None else n)
        have = st.keys[0].shape[2]
        if want == have:
            return
        if want < have and any(np.any(k[:, :, want:]) for k in st.keys):
            raise ValueError("the ring holds tokens beyond the slots in use")  # a corrupt state, never a user's
        full = self.cfg.sinks + self.cfg.window
        st.keys = [_regrow(a, want, full, axis=2) for a in st.keys]
        st.values = [_regrow(a, want, full, axis=3) for a in st.values]

    def full_ring(self, st: State) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """st's keys and values padded to S + W slots (sessions store them so, whatever the graph)."""
        full = self.cfg.sinks + self.cfg.window
        more = full - st.keys[0].shape[2]
        if not more:  # the steady state: nothing to pad, no 2 x 47 MB copy per save
            return st.keys, st.values
        return ([np.pad(k, [(0, 0), (0, 0), (0, more), (0, 0)]) for k in st.keys],
                [np.pad(v, [(0, 0), (0, 0), (0, 0), (0, more)]) for v in st.values])

    def new_state(self) -> State:
        c = self.cfg
        P, full = self.ring_slots(0), c.sinks + c.window
        levels = [self._store(lv) for lv in cms.empty_levels(c.cms)]
        no_k = np.zeros((1, c.n_kv_heads, 0, c.head_dim), np.float32)
        no_v = np.zeros((1, c.n_kv_heads, c.head_dim, 0), np.float32)
        st = State(keys=[_regrow(no_k, P, full, axis=2) for _ in range(c.n_layers)],
                   values=[_regrow(no_v, P, full, axis=3) for _ in range(c.n_layers)],
                   levels=levels, acc=np.zeros(c.cms.event_dim, np.float32))
        if c.cms.rows:
            st.rows = rows_mod.empty(c, self.state_format)
        self.refresh_views(st)
        return st

    def _store(self, lv: cms.Level) -> StoredLevel:
        mem, _ = state_codec.encode(lv.mem, self.state_format)
        keys, _ = state_codec.encode(lv.keys, self.state_format)
        return StoredLevel(mem=mem, keys=keys, usage=lv.usage.astype(np.float32))

    def _load(self, s: StoredLevel) -> cms.Level:
        return cms.Level(state_codec.decode(s.mem, self.state_format),
                         state_codec.decode(s.keys, self.state_format), s.usage.copy())

    def _level_views(self, st: State) -> None:
        st.views = [(np.ascontiguousarray(state_codec.decode(s.mem, self.state_format)),
                     np.ascontiguousarray(state_codec.decode(s.keys, self.state_format))) for s in st.levels]

    def refresh_views(self, st: State) -> None:
        self._level_views(st)
        if st.rows is not None:
            st.row_views = rows_mod.views(st.rows, self.cfg, self.state_format)

    def state_bytes(self, st: State) -> list[int]:
        """Bytes of the stored memory per CMS level (the row level last, when there is one)."""
        out = [state_codec.nbytes(s.mem) + state_codec.nbytes(s.keys) + s.usage.nbytes for s in st.levels]
        if st.rows is not None:
            r = st.rows
            out.append(state_codec.nbytes(r.keys) + state_codec.nbytes(r.values) + r.usage.nbytes + r.token.nbytes
                       + r.pending.nbytes)
        return out

    # ------------------------------------------------------------------ stepping
    def _piece(self, st: State, ids: np.ndarray, memory: bool = True, all_logits: bool = True) -> np.ndarray:
        """ids (T,) within one chunk -> logits (T, V), or (1, V) of the last token; updates st.
        memory=False: sidecar off (reads see an empty memory, no writes), for ablations."""
        c = self.cfg
        T = int(ids.shape[0])
        plan = ring.plan_step(st.n, T, c.sinks, c.window)
        self.fit_ring(st, st.n + T)
        P, full = st.keys[0].shape[2], c.sinks + c.window
        mask = plan.attn_mask if P == full else np.ascontiguousarray(  # slots P.. hold nothing yet: masked anyway
            np.concatenate([plan.attn_mask[:, :P], plan.attn_mask[:, full:]], axis=1))
        feed = {contract.INPUT_IDS: ids.reshape(1, T).astype(np.int64), contract.Q_POS: plan.q_pos,
                contract.SINK_Q_POS: plan.sink_q_pos, contract.ATTN_MASK: mask,
                contract.LOGITS_FROM: np.array(0 if all_logits else T - 1, np.int64)}
        for i in range(c.n_layers):
            feed[contract.past_key(i)] = st.keys[i]
            feed[contract.past_value(i)] = st.values[i]
        views = st.views if memory else self._empty_views()
        for lvl, (m, k) in enumerate(views):
            feed[contract.mem(lvl)] = m
            feed[contract.mem_key(lvl)] = k
        if st.rows is not None:
            rk, rv = st.row_views if memory else self._empty_row_views()
            for j, i in enumerate(self.row_layers):
                feed[contract.row_key(i)] = rk[j]
                feed[contract.row_value(i)] = rv[j]
            a = st.n + np.arange(T, dtype=np.int64)
            feed[contract.ROW_MASK] = rows_mod.mask(st.rows.token if memory else self._no_tokens, a, c.window)
        outs = self.sess.run(self._out, feed)
        for i in range(c.n_layers):
            st.keys[i][:, :, plan.slots, :] = outs[1 + 2 * i]
            st.values[i][:, :, :, plan.slots] = outs[2 + 2 * i]
        shift = ring.frame_shift(st.n, st.n + T, c.sinks, c.window)
        if shift:  # the ring's rotary frame moved (once per W tokens): rotate its keys back by as much
            for k in st.keys:
                k[:, :, c.sinks:] = ring.rotate(k[:, :, c.sinks:], -shift, c.rope_theta, c.rope_freq_divisors)
        feat = outs[-1][0]  # (T, d_z)
        for t in range(T):  # token by token: the same summation order whatever the piece size
            st.acc += feat[t]
        if st.rows is not None and memory:
            c0 = c.cms.chunk + st.n % c.cms.chunk  # pending holds the previous chunk, then this one
            st.rows.pending[c0:c0 + T] = rows_mod.gates(feat, self.write_w)
        st.n += T
        if st.n % c.cms.chunk == 0:
            if memory:
                self.memory_event(st)
            else:
                st.acc = np.zeros_like(st.acc)
        return outs[0][0]

    def memory_event(self, st: State) -> dict:
        c = self.cfg.cms
        st.events += 1
        s = st.acc / np.float32(c.chunk)
        levels = [self._load(x) for x in st.levels]
        new, info = cms.event_step(levels, s, st.events, self.write_w, c)
        st.levels = [self._store(x) for x in new]
        st.acc = np.zeros_like(st.acc)
        self._level_views(st)
        if st.rows is not None:
            info["rows"] = rows_mod.event(st.rows, st.keys, st.values, st.n, self.cfg, self.state_format)
            if info["rows"]:  # rows change rarely: their views are rebuilt only then
                st.row_views = rows_mod.views(st.rows, self.cfg, self.state_format)
        return info

    def _empty_row_views(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if not hasattr(self, "_zero_rows"):
            c = self.cfg
            R = c.cms.rows
            self._zero_rows = ([np.zeros((1, c.n_kv_heads, R, c.head_dim), np.float32) for _ in self.row_layers],
                               [np.zeros((1, c.n_kv_heads, c.head_dim, R), np.float32) for _ in self.row_layers])
            self._no_tokens = np.full(R, -1, np.int64)
        return self._zero_rows

    def _empty_views(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if not hasattr(self, "_zeros"):
            self._zeros = [(np.zeros((n, d), np.float32), np.zeros((n, self.cfg.cms.key_dim), np.float32))
                           for n, d in zip(self.cfg.cms.slots, self.cfg.cms.widths)]
        return self._zeros

    def feed(self, st: State, ids, max_piece: int | None = None, all_logits: bool = False,
             memory: bool = True) -> np.ndarray:
        """Feed tokens; returns the last token's logits (V,) or all (T, V). max_piece=1: token by token."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("nothing to feed")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError("token id out of the vocabulary")
        out, pos = [], 0
        for n in ring.split_pieces(st.n, ids.size, self.cfg.cms.chunk):
            step = n if max_piece is None else max_piece
            for j in range(0, n, step):
                p = min(step, n - j)
                logits = self._piece(st, ids[pos:pos + p], memory, all_logits)
                pos += p
                if all_logits:
                    out.append(logits)
        return np.concatenate(out, axis=0) if all_logits else logits[-1]


RING_GROWTH = 8  # a filling ring grows by W / 8 slots at a time


def _regrow(a: np.ndarray, want: int, full: int, axis: int) -> np.ndarray:
    """a, `have` slots long on `axis` (keys: 2 of (1, KV, P, hd); values: 3 of (1, KV, hd, P)) -> `want` slots
    long, the first `have` slots kept, new ones zero: in place when a is a view of a full-size buffer
    (fit_ring), else into a new one. In place, the rows before `axis` (KV heads of keys, KV * hd rows of
    values) move to their new offsets through a copy of the slots in use."""
    shape, have = a.shape, a.shape[axis]
    rows, inner = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    new_shape = (*shape[:axis], want, *shape[axis + 1:])
    base = a.base
    if base is None or base.ndim != 1 or base.size != rows * full * inner or base.dtype != np.float32 \
            or a.ctypes.data != base.ctypes.data:
        base = np.zeros(rows * full * inner, np.float32)
        out = base[:rows * want * inner].reshape(new_shape)
        m = min(want, have)
        np.moveaxis(out, axis, 0)[:m] = np.moveaxis(a, axis, 0)[:m]
        return out
    keep = min(want, have) * inner
    kept = base[:rows * have * inner].reshape(rows, have * inner)[:, :keep].copy()  # one array's slots in use
    out = base[:rows * want * inner].reshape(rows, want * inner)
    out[:, :keep] = kept
    out[:, keep:] = 0.0
    return out.reshape(new_shape)


def default_threads(threads: int | None = None) -> int:
    """threads (at most the machine's cores: more only contend), or up to 4 cores (the Pi 5 has 4)."""
    cores = os.cpu_count() or 1
    return int(min(threads, cores) if threads else min(4, cores))


def session_options(threads: int | None) -> ort.SessionOptions:
    """The runtime's onnxruntime settings: intra-op threads (default: up to 4 cores), full graph optimization."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = default_threads(threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def release_free_memory() -> None:
    """Hand memory freed while onnxruntime loaded the graph back to the OS (glibc keeps it otherwise):
    88 MB of RSS on SmolLM2 int8. A no-op where malloc_trim does not exist."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_write_weights(bundle: Bundle) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        w = load_file(str(bundle.file(contract.CMS_WRITE_WEIGHTS)))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"CMS write weights unreadable: {e}") from None
    shapes = cms.write_param_shapes(bundle.config.cms)
    if bundle.config.cms.rows:
        shapes.update(rows_mod.gate_param_shapes(bundle.config.cms.event_dim))
    for k, shape in shapes.items():
        if k not in w:
            raise BundleError(f"CMS write weights lack {k}")
        if tuple(w[k].shape) != shape:
            raise BundleError(f"CMS write weight {k} has shape {tuple(w[k].shape)}, the config says {shape}")
    return {k: v.astype(np.float32) for k, v in w.items()}
