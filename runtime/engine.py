"""The runtime engine: holds the state, runs the ONNX graphs, steps the CMS jump map in NumPy.

NumPy + onnxruntime only. One token's path:

   token ─► plan (ring.py: positions, visibility) ─► ONNX graph ─► logits ─► sampler
                                                      │  ▲
          the K/V buffers, written in place ◄─────────┘  │ mem.{l}, mem_key.{l}: fp32 views of the stored state
          write_feat ─► acc += feat                       │
   every C tokens: s = acc / C ─► jump map (cms.py) on decode(stored) ─► encode ─► stored ─► fresh fp32 views
   at each chunk start: the buffers laid out for the chunk (ring.py): moved, re-rotated, the rows written
   before each step: the sinks and rows rotated for the graph's branch (decode: to the token's frame; chunk:
   their own frame), and the graph runs its decode branch (T = 1) or its chunk branch (contract.py)

State (all of it bounded, whatever the history length):
   kv      per layer: keys, values (1, KV, M, hd) fp32   [rows | sinks | recent tokens] (ring.py), keys rotated
                                                          (int8 in an 8-bit cache: every row written is rounded
                                                          with the bundle's static scales, quantize/kv_cache.py);
                                                          bound to the graph's past and present (IO binding),
                                                          so GroupQueryAttention writes a decode step's new rows
                                                          in place (a chunk's come out, NumPy writes them)
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
from cortex_edge.quantize import kv_cache, state_codec
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
    keys: list[np.ndarray]  # per layer (1, KV, M, hd): ring.py's buffer, keys rotated
    values: list[np.ndarray]  # per layer (1, KV, M, hd)
    levels: list[StoredLevel]
    acc: np.ndarray
    n: int = 0
    events: int = 0
    prepared: int = -1  # the chunk start the buffers are laid out for (ring.py)
    sink_keys: np.ndarray | None = None  # (L, KV, S, hd) the sinks' keys in their own frame, once all are in
    placed: int | None = 0  # the rotation the buffers' sinks and rows hold, from their own frame (None: unknown)
    views: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # derived fp32 (mem, keys)
    rows: rows_mod.RowState | None = None  # the row level (runtime/rows.py), when the model has one
    row_views: tuple[list[np.ndarray], list[np.ndarray]] | None = None  # derived fp32 (keys in the sinks' frame)

    def copy(self) -> State:
        return copy.deepcopy(self)

    def used(self, lay: ring.Layout) -> int:
        """Buffer rows holding anything: everything after them is zero."""
        if self.n == 0:
            return lay.rows
        return int(lay.index(self.n - 1, max(self.prepared, 0))) + 1


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
        self.lay = ring.Layout.of(self.cfg)
        self._in = contract.input_names(L, lv, bool(self.cfg.cms.rows))
        self._out = contract.output_names(L)
        self._check_graph_shapes()
        # an 8-bit attention cache's scales [(key scale, value scale) (KV, 1, hd)] a layer, or None (fp32 buffers)
        self.kv_scales = load_kv_scales(bundle) if bundle.kv_cache == "int8" else None
        if self.kv_scales is not None:  # the key scales stacked (layers, KV, 1, hd), for place()
            ks = np.stack([k for k, _ in self.kv_scales])
            self._key_scales = {"all": ks, "rows": ks[list(self.row_layers)]}
        self._binding: tuple[list[int], ort.IOBinding, list] | None = None
        self._ropes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # place(): the angles of each distance
        self._halves: dict[str, tuple] = {}  # place(): the sinks' and rows' keys with their rotate_half

    def _check_graph_shapes(self) -> None:
        """The graphs must take exactly the contract's inputs, with the config's fixed sizes, and buffers of the
        manifest's attention cache format."""
        c = self.cfg
        M = self.lay.capacity
        want = {contract.past_key(0): [1, c.n_kv_heads, M, c.head_dim],
                contract.past_value(0): [1, c.n_kv_heads, M, c.head_dim]}
        for lvl, (n, d) in enumerate(zip(c.cms.slots, c.cms.widths)):
            want[contract.mem(lvl)] = [n, d]
            want[contract.mem_key(lvl)] = [n, c.cms.key_dim]
        got = {i.name: i.shape for i in self.sess.get_inputs()}
        if set(got) != set(self._in) or [o.name for o in self.sess.get_outputs()] != self._out:
            raise BundleError("bundle graph does not have the contract's inputs and outputs "
                              f"(contract version {contract.CONTRACT_VERSION}: export the bundle again)")
        for name, shape in want.items():
            if list(got[name]) != shape:
                raise BundleError(f"bundle graph input {name} has shape {got[name]}, the config says {shape}")
        buffers = {contract.past_key(i) for i in range(c.n_layers)} | {contract.past_value(i) for i in range(c.n_layers)}
        types = {i.name: i.type for i in self.sess.get_inputs() if i.name in buffers}
        kv = {"tensor(float)": "fp32", "tensor(int8)": "int8"}.get(types[contract.past_key(0)])
        if kv is None or set(types.values()) != {types[contract.past_key(0)]} or kv != self.bundle.kv_cache:
            raise BundleError(f"bundle graph's attention buffers are {sorted(set(types.values()))}, its manifest "
                              f"says a {self.bundle.kv_cache} cache")

    # ------------------------------------------------------------------ state
    def new_state(self) -> State:
        c = self.cfg
        shape = (1, c.n_kv_heads, self.lay.capacity, c.head_dim)  # zeros: pages become resident as they fill
        levels = [self._store(lv) for lv in cms.empty_levels(c.cms)]
        dt = np.float32 if self.kv_scales is None else np.int8
        st = State(keys=[np.zeros(shape, dt) for _ in range(c.n_layers)],
                   values=[np.zeros(shape, dt) for _ in range(c.n_layers)],
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

    def prepare(self, st: State, memory: bool = True) -> None:
        """Lay st's buffers out for the chunk its next token is in (ring.py), in place: move the recent tokens
        when the region's base moves, rotate them when the frame moves, and write the rows (place). Once per
        chunk (pieces never cross one); the torch reference is TorchStream.prepare. memory=False: the rows are
        left out (sidecar off)."""
        c, lay = self.cfg, self.lay
        S, R = c.sinks, lay.rows
        c0 = ring.chunk_start(st.n, lay.chunk)
        if st.prepared == c0:
            return
        old = max(st.prepared, 0)
        d_base, d_frame = lay.base(c0) - lay.base(old), lay.frame(c0) - lay.frame(old)
        used = st.used(lay)
        for i, (k, v) in enumerate(zip(st.keys, st.values)):
            if d_base:  # the oldest d_base tokens of the region are out of every coming query's window
                for a in (k, v):
                    a[:, :, R + S:used - d_base] = a[:, :, R + S + d_base:used]
                    a[:, :, used - d_base:used] = 0
            if d_frame:
                region = slice(R + S, used - d_base)
                k[:, :, region] = self._stored(ring.rotate(self._read(k[:, :, region], i), -d_frame, c.rope_theta,
                                                           c.rope_freq_divisors), i)
        if st.sink_keys is None and c0 >= S and st.placed == 0:  # every sink is in, at its own position
            st.sink_keys = np.stack([self._read(k[0, :, R:R + S], i) for i, k in enumerate(st.keys)])
        st.prepared = c0
        st.placed = None  # the rows are written again below (place): they may have changed at the last event
        self.place(st, 0, memory)

    def place(self, st: State, delta: int, memory: bool = True) -> None:
        """Write the sinks and the rows into st's buffers rotated by delta from their own frame: 0 for the exact
        attention of chunks, ring.sink_delta(a) for GroupQueryAttention at a decode step of token a (which then
        reads them at the same distances as the exact attention). Skipped when they already hold delta."""
        if st.placed == delta:
            return
        R, S = self.lay.rows, self.cfg.sinks
        cos, sin = self._rope(delta)
        if st.sink_keys is not None and S:
            sinks = ring.rotate_pair(*self._with_half("sinks", st.sink_keys, lambda k: k), cos, sin)
            sinks = self._stored_layers(sinks, "all")
            for i, k in enumerate(st.keys):
                k[0, :, R:R + S] = sinks[i]
        if R and len(self.row_layers):
            views = st.row_views if memory else self._empty_row_views()
            if st.placed is None:  # the rows were (re)written: their values too (values are never rotated)
                for j, i in enumerate(self.row_layers):
                    st.values[i][0, :, :R] = self._stored(views[1][j], i, 1)
            # every row layer's keys at once (row layers, KV, R, hd)
            keys = ring.rotate_pair(*self._with_half("rows", views, lambda v: np.stack(v[0])), cos, sin)
            keys = self._stored_layers(keys, "rows")
            for j, i in enumerate(self.row_layers):
                st.keys[i][0, :, :R] = keys[j]
        st.placed = delta

    def _stored(self, x: np.ndarray, i: int, which: int = 0) -> np.ndarray:
        """fp32 rows x (..., KV, rows, hd) as layer i's buffer holds them: themselves, or int8 steps of an 8-bit
        cache's scales (which: 0 keys, 1 values; quantize/kv_cache.py)."""
        return x if self.kv_scales is None else kv_cache.quantize(x, self.kv_scales[i][which])

    def _stored_layers(self, keys: np.ndarray, layers: str) -> np.ndarray:
        """Keys of every layer ("all") or of the row layers ("rows"), (layers, KV, rows, hd), as their buffers hold
        them, in one pass (place() does this before every decode step)."""
        return keys if self.kv_scales is None else kv_cache.quantize(keys, self._key_scales[layers])

    def _read(self, x: np.ndarray, i: int, which: int = 0) -> np.ndarray:
        """Rows of layer i's buffer (..., KV, rows, hd) as fp32."""
        return x if self.kv_scales is None else kv_cache.dequantize(x, self.kv_scales[i][which])

    def _with_half(self, slot: str, source, make) -> tuple[np.ndarray, np.ndarray]:
        """(x, ring.rotate_half(x)) for x = make(source), made again only when source is another object (it is
        held with them, so its id stays its own): the sinks' keys and the row views change rarely."""
        held = self._halves.get(slot)
        if held is None or held[0] is not source:
            x = np.ascontiguousarray(make(source), dtype=np.float32)
            held = self._halves[slot] = (source, x, ring.rotate_half(x))
        return held[1], held[2]

    def _rope(self, delta: int) -> tuple[np.ndarray, np.ndarray]:
        """ring.rope_angles(delta) in float32, kept for the deltas in use (a decode step's delta grows by one a
        token; a frame holds at most 2W + C + D of them)."""
        cache = self._ropes
        if delta not in cache:
            if len(cache) > 4096:
                cache.clear()
            c = self.cfg
            cos, sin = ring.rope_angles(delta, c.head_dim, c.rope_theta, c.rope_freq_divisors)
            cache[delta] = (cos.astype(np.float32), sin.astype(np.float32))
        return cache[delta]

    # ------------------------------------------------------------------ stepping
    def _buffers(self, st: State):
        """(past name, present name, array) of each layer's key and value buffer, in the graph's order."""
        for i, (k, v) in enumerate(zip(st.keys, st.values)):
            yield contract.past_key(i), contract.present_key(i), k
            yield contract.past_value(i), contract.present_value(i), v

    def _bind(self, st: State) -> ort.IOBinding:
        """One IO binding per state for decode steps: each layer's past and present bound to the same OrtValue
        over st's arrays (onnxruntime then writes the new rows into them in place; an OrtValue made from a NumPy
        array shares its memory). Made again only when the arrays change (another state, a copy)."""
        ids = [id(a) for a in st.keys + st.values]
        if self._binding is None or self._binding[0] != ids:
            b = self.sess.io_binding()
            for past, present, a in self._buffers(st):
                ov = ort.OrtValue.ortvalue_from_numpy(a)
                b.bind_ortvalue_input(past, ov)
                b.bind_ortvalue_output(present, ov)
            self._binding = (ids, b, st.keys + st.values)  # the arrays held: their ids stay theirs
        return self._binding[1]

    def _bind_chunk(self, st: State, T: int) -> tuple[ort.IOBinding, list[tuple[np.ndarray, np.ndarray]]]:
        """The binding of a chunk (T > 1): the buffers in, the new tokens' rows out into arrays of their own.
        Returns the binding and (buffer, its new rows) pairs."""
        c = self.cfg
        b = self.sess.io_binding()
        new = []
        for past, present, a in self._buffers(st):
            out = np.empty((1, c.n_kv_heads, T, c.head_dim), a.dtype)
            b.bind_ortvalue_input(past, ort.OrtValue.ortvalue_from_numpy(a))
            b.bind_ortvalue_output(present, ort.OrtValue.ortvalue_from_numpy(out))
            new.append((a, out))
        return b, new

    def _piece(self, st: State, ids: np.ndarray, memory: bool = True, all_logits: bool = True) -> np.ndarray:
        """ids (T,) within one chunk -> logits (T, V), or (1, V) of the last token; updates st.
        memory=False: sidecar off (reads see an empty memory, no writes), for ablations."""
        c = self.cfg
        T = int(ids.shape[0])
        self.prepare(st, memory)
        row_mask = None
        if st.rows is not None:
            a = st.n + np.arange(T, dtype=np.int64)
            row_mask = rows_mod.mask(st.rows.token if memory else self._no_tokens(), a, c.window, c.cms.rows_bias)
        plan = ring.plan_step(st.n, T, self.lay, row_mask)
        if T == 1:  # the decode branch: GroupQueryAttention, the sinks and rows rotated to the token's frame
            self.place(st, self.lay.sink_delta(st.n), memory)
            b, new = self._bind(st), []
        else:  # the chunk branch: the exact attention, the sinks and rows in their own frame
            self.place(st, 0, memory)
            b, new = self._bind_chunk(st, T)
        feed = {contract.INPUT_IDS: ids.reshape(1, T).astype(np.int64), contract.Q_POS: plan.q_pos,
                contract.SINK_POS: plan.sink_pos, contract.SEQLENS_K: np.array([plan.total - 1], np.int32),
                contract.TOTAL_LEN: np.array(plan.total, np.int32), contract.ATTN_BIAS: plan.bias,
                contract.LOGITS_FROM: np.array(0 if all_logits else T - 1, np.int64)}
        if plan.row_bias is not None:
            feed[contract.ROW_BIAS] = plan.row_bias
        views = st.views if memory else self._empty_views()
        for lvl, (m, k) in enumerate(views):
            feed[contract.mem(lvl)] = m
            feed[contract.mem_key(lvl)] = k
        for name, x in feed.items():
            b.bind_cpu_input(name, x)
        # the two outputs that leave the graph, written straight into NumPy arrays (get_outputs() would wrap
        # every bound output, the 2L buffers included, in a Python object each step: ~0.4 ms)
        logits = np.empty((1, T if all_logits else 1, c.vocab_size), np.float32)
        feat = np.empty((1, T, c.cms.event_dim), np.float32)
        b.bind_ortvalue_output(contract.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        b.bind_ortvalue_output(contract.WRITE_FEAT, ort.OrtValue.ortvalue_from_numpy(feat))
        self.sess.run_with_iobinding(b)
        for a, n in new:  # a chunk's rows, into the buffers where GroupQueryAttention would have put them
            a[:, :, plan.total - T:plan.total] = n
        logits, feat = logits[0], feat[0]  # (T or 1, V), (T, d_z)
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
        return logits

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
            info["rows"] = rows_mod.event(st.rows, st.keys, st.values, st.n, self.cfg, self.state_format,
                                          self.kv_scales)
            if info["rows"]:  # rows change rarely: their views are rebuilt only then
                st.row_views = rows_mod.views(st.rows, self.cfg, self.state_format)
        return info

    def _empty_row_views(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if not hasattr(self, "_zero_rows"):
            c = self.cfg
            z = np.zeros((c.n_kv_heads, c.cms.rows, c.head_dim), np.float32)
            self._zero_rows = ([z for _ in self.row_layers], [z for _ in self.row_layers])
        return self._zero_rows

    def _no_tokens(self) -> np.ndarray:
        return np.full(self.cfg.cms.rows, -1, np.int64)

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


def load_kv_scales(bundle: Bundle) -> list[tuple[np.ndarray, np.ndarray]]:
    """An 8-bit attention cache's scales from the bundle: [(key scale, value scale) (KV, 1, hd)] a layer."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    c = bundle.config
    try:
        w = load_file(str(bundle.file(contract.KV_SCALES)))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"attention cache scales unreadable: {e}") from None
    out = []
    for i in range(c.n_layers):
        pair = []
        for name in (contract.key_scale(i), contract.value_scale(i)):
            x = w.get(name)
            if x is None or x.shape != (c.n_kv_heads, c.head_dim) or not np.all(np.isfinite(x) & (x > 0)):
                raise BundleError(f"attention cache scale {name} is missing, misshapen or not positive")
            pair.append(np.ascontiguousarray(x.astype(np.float32)[:, None, :]))
        out.append((pair[0], pair[1]))
    return out


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
