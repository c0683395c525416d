"""CortexLM: a Llama-family decoder (HF Llama parameter names and maths) + the CMS sidecar.

`step` is exactly the exported graph (see contract.py for its signature): it takes the bounded
attention state and the CMS state as explicit tensors and returns logits, the new tokens' keys
and values, and the per-token write features. `TorchStream` drives it the way the NumPy runtime
drives the ONNX graph (ring writes, memory events every C tokens), so the two can be compared
token by token. What this leaves out: tokenization, sampling, storage formats.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cortex_edge.config import ModelConfig
from cortex_edge.model.cms import CMSReader, CMSWriter, RMSNorm, empty_state
from cortex_edge.runtime import ring


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, divisors: tuple[float, ...] = ()):
    """pos (...,) int64 -> cos, sin (..., hd) in HF's [f, f] layout. divisors: RoPE scaling (config.py)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,), as HF
    if divisors:
        inv = inv / torch.tensor(divisors, dtype=torch.float32)
    ang = pos.to(torch.float32).unsqueeze(-1) * inv  # (..., hd/2)
    ang = torch.cat([ang, ang], dim=-1)  # (..., hd)
    return ang.cos(), ang.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    x1, x2 = x.split([h, h], dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's layout (the exported graph uses onnxruntime's kernel instead: _ExportedRope)."""
    return x * cos + rotate_half(x) * sin


class RopeTables(NamedTuple):
    """The rotation while exporting: positions (1, T) into cos/sin tables (P, hd/2) over positions 0..P - 1,
    holding exactly rope_cos_sin's fp32 values."""
    pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class _ExportedRope(torch.autograd.Function):
    """rotate() from RopeTables, exported as onnxruntime's RotaryEmbedding (HF half-split layout): one kernel
    where rotate() is six elementwise operators (Split, Neg, Concat, Mul, Mul, Add). Export only (no
    backward): training and the reference run rotate() itself. (Measured effect: docs/performance.md.)"""

    @staticmethod
    def forward(ctx, x, pos, cos_t, sin_t):
        cos, sin = cos_t[pos[0]], sin_t[pos[0]]  # (T, hd/2)
        return rotate(x, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))

    @staticmethod
    def symbolic(g, x, pos, cos_t, sin_t):
        out = g.op("com.microsoft::RotaryEmbedding", x, pos, cos_t, sin_t, interleaved_i=0)
        out.setType(x.type())  # same shape and type as x (the exporter cannot infer a contrib op's)
        return out


def ropes_at(positions: list[torch.Tensor], head_dim: int, theta: float, max_pos: int,
             divisors: tuple[float, ...] = ()) -> list:
    """The rotation at each positions tensor (T,): cos, sin (T, hd) for rotate(); while exporting, RopeTables
    sharing one pair of tables over positions 0..max_pos (the graph then holds the tables, not the
    trigonometry; onnxruntime refuses a position beyond them)."""
    if not torch.onnx.is_in_onnx_export():
        return [rope_cos_sin(pos, head_dim, theta, divisors) for pos in positions]
    cos, sin = rope_cos_sin(torch.arange(max_pos + 1), head_dim, theta, divisors)
    h = head_dim // 2
    cos, sin = cos[:, :h].contiguous(), sin[:, :h].contiguous()
    return [RopeTables(pos.unsqueeze(0), cos, sin) for pos in positions]


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """x (..., T, hd) rotated by one of ropes_at's rotations."""
    if isinstance(rope, RopeTables):
        return _ExportedRope.apply(x, *rope)
    return rotate(x, *rope)


def graph_batch(x: torch.Tensor) -> int:
    """The batch size as a constant while exporting (the graph has batch 1): every reshape then has a constant
    target shape, where a traced x.shape[0] costs Shape/Gather/Unsqueeze/Concat nodes in each layer, each step."""
    return 1 if torch.onnx.is_in_onnx_export() else x.shape[0]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, H * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.dim, KV * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.dim, KV * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(H * hd, cfg.dim, bias=cfg.attn_out_bias)
        self.qkv_proj: nn.Linear | None = None  # fuse(): one matmul for q, k, v (the exported graph)

    @torch.no_grad()
    def fuse(self) -> None:
        """q, k, v projections as one Linear: one weight-read kernel instead of three (fewer small matmuls,
        whose dispatch dominates at decode). Same maths."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        self.qkv_proj = nn.Linear(w.shape[1], w.shape[0], bias=self.cfg.attn_bias)
        self.qkv_proj.weight.copy_(w)
        if self.cfg.attn_bias:
            self.qkv_proj.bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, q_rope, sink_rope, mask, past_k, past_v, n, row_k=None, row_v=None):
        """past_k (B, KV, n, hd) holds keys already rotated (ring: in the current frame; sinks: at their own
        position); past_v (B, KV, hd, n) holds values transposed. Both caches are the left operand of their
        matmul, scores and probabilities are kept slots-by-queries: a one-token step is then a matrix times a
        few columns that streams the cache once (q @ K^T and p @ V make onnxruntime pack, i.e. copy, the whole
        cache first; docs/performance.md has the profile).
        n: past_k.shape[2] (S + W, or fewer slots while the ring is still filling), given by the caller so that
        the graph reads the ring's length once, not per layer.
        q_rope, sink_rope: ropes_at's rotations at the queries' positions and at their sink positions.
        Queries and keys are rotated together (one RotaryEmbedding kernel in the graph), and 1/sqrt(hd) is
        applied to each score matmul (onnxruntime folds it into the matmul): a one-token step's small operators
        cost microseconds each whatever their size, so the formulation keeps them few. Every reshape has one
        free (-1) axis, the new tokens', so the exported graph does no shape arithmetic.
        row_k (B, KV, R, hd), row_v (B, KV, hd, R): the row level (runtime/rows.py), seen from the sinks' query
        position like the sinks; mask then covers [cache | rows | new tokens].
        Returns the output, the new keys (B, KV, T, hd) and the new values (B, KV, hd, T), in cache layout."""
        cfg = self.cfg
        B = graph_batch(x)
        H, KV, hd, S = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.sinks
        G = H // KV
        if self.qkv_proj is not None:
            qk, v = self.qkv_proj(x).split([(H + KV) * hd, KV * hd], dim=-1)
        else:
            qk, v = torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1), self.v_proj(x)
        qk = qk.view(B, -1, H + KV, hd).transpose(1, 2)  # (B, H + KV, T, hd): the query heads, then the key heads
        v = v.view(B, -1, KV, hd).permute(0, 2, 3, 1)  # (B, KV, hd, T)
        q, k = apply_rope(qk, q_rope).split([H, KV], dim=1)  # k (B, KV, T, hd) rotated: goes to the ring as is
        # head h = kv * G + g uses kv head h // G (HF repeat_kv): columns g * T + t of (B, KV, hd, G * T)
        q = q.reshape(B, KV, -1, hd).transpose(-1, -2)  # (B, KV, hd, G*T)
        scale = 1.0 / math.sqrt(hd)
        s_past = torch.matmul(past_k, q) * scale  # (B, KV, n, G*T)
        s_new = torch.matmul(k, q) * scale  # (B, KV, T, G*T)
        if S:  # the sinks, seen from each query's own sink position
            qs = apply_rope(qk[:, :H], sink_rope)
            qs = qs.reshape(B, KV, -1, hd).transpose(-1, -2)
            s_sink = torch.matmul(past_k[:, :, :S], qs) * scale  # (B, KV, S, G*T)
            parts = [s_sink, s_past[:, :, S:], s_new]
            if row_k is not None:  # the rows, from the sinks' query position too
                parts.insert(2, torch.matmul(row_k, qs) * scale)  # (B, KV, R, G*T)
        else:
            parts = [s_past, s_new]
        scores = torch.cat(parts, dim=2) + mask.t().repeat(1, G)  # mask (T, n+T) per head g
        p = torch.softmax(scores, dim=2)  # over the n (+ R) + T slots
        if row_k is not None:
            r = row_k.shape[2]
            o = torch.matmul(past_v, p[:, :, :n]) + torch.matmul(row_v, p[:, :, n:n + r]) \
                + torch.matmul(v, p[:, :, n + r:])
        else:
            o = torch.matmul(past_v, p[:, :, :n]) + torch.matmul(v, p[:, :, n:])  # (B, KV, hd, G*T), no K/V concat
        o = o.reshape(B, KV, hd, G, -1).permute(0, 4, 1, 3, 2).reshape(B, -1, H * hd)
        return self.o_proj(o), k, v


ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=b)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=b)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=b)
        self.act = ACT[cfg.hidden_act]
        self.gate_up_proj: nn.Linear | None = None  # fuse(): one matmul for gate and up

    @torch.no_grad()
    def fuse(self) -> None:
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        b = self.gate_proj.bias is not None
        self.gate_up_proj = nn.Linear(w.shape[1], w.shape[0], bias=b)
        self.gate_up_proj.weight.copy_(w)
        if b:
            self.gate_up_proj.bias.copy_(torch.cat([self.gate_proj.bias, self.up_proj.bias]))
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            f = self.down_proj.in_features  # constant split sizes: no shape arithmetic in the graph
            g, u = self.gate_up_proj(x).split([f, f], dim=-1)
            return self.down_proj(self.act(g) * u)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, q_rope, sink_rope, mask, past_k, past_v, n, row_k=None, row_v=None):
        a, k, v = self.self_attn(self.input_layernorm(x), q_rope, sink_rope, mask, past_k, past_v, n, row_k, row_v)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class CortexLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cms_read = CMSReader(cfg.dim, cfg.cms, cfg.norm_eps)
        self.cms_write = CMSWriter(cfg.cms)

    @torch.no_grad()
    def init_weights(self, seed: int, std: float = 0.02) -> CortexLM:
        """Deterministic random init (builtin models are made from a seed). Keeps the sidecar's W_o at zero."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm_in.weight") or name.endswith("norm_out.weight") or "layernorm" in name \
                    or name == "model.norm.weight" or name.endswith("temperature"):
                p.fill_(1.0)
            elif name == "cms_read.out.weight":
                p.zero_()
            elif name == "cms_read.gate.bias":
                p.fill_(-1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                s = std if p.dim() == 1 or name.startswith(("model.", "lm_head")) else 1.0 / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) * s)
        return self

    def step(self, input_ids, q_pos, sink_q_pos, attn_mask, past_keys, past_values, mems, mem_keys,
             return_stats: bool = False, logits_from: torch.Tensor | None = None, row_keys=None, row_values=None,
             row_mask=None):
        """The graph. input_ids (B, T); q_pos, sink_q_pos (T,); past_keys[i] (B, KV, S+W, hd) rotated
        (runtime/ring.py), past_values[i] (B, KV, hd, S+W); mems[l] (B, N_l, d_l); mem_keys[l] (B, N_l, d_k).
        logits_from: () int64, logits of tokens logits_from.. only (None: all).
        row_keys[j], row_values[j]: the row level for the j-th layer of cfg.cms.row_layers, row_mask (T, R).
        Returns logits (B, T, V), new keys (rotated at q_pos) (B, KV, T, hd) and values (B, KV, hd, T), as the
        caches hold them, and write_feat (B, T, d_z)."""
        cfg = self.cfg
        q_rope, sink_rope = ropes_at([q_pos, sink_q_pos], cfg.head_dim, cfg.rope_theta,
                                     ring.max_position(cfg.sinks, cfg.window), cfg.rope_freq_divisors)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        new_k, new_v, feat, stats = [], [], None, None
        n = past_keys[0].shape[2]  # ring slots, read once for every layer
        rl = cfg.cms.row_layers(cfg.n_layers)
        if len(rl):  # one mask for the row layers: [cache | rows | new tokens]
            row_attn_mask = torch.cat([attn_mask[:, :n], row_mask, attn_mask[:, n:]], dim=1)
        for i, layer in enumerate(self.model.layers):
            if i in rl:
                j = i - rl.start
                x, k, v = layer(x, q_rope, sink_rope, row_attn_mask, past_keys[i], past_values[i], n,
                                row_keys[j], row_values[j])
            else:
                x, k, v = layer(x, q_rope, sink_rope, attn_mask, past_keys[i], past_values[i], n)
            new_k.append(k)
            new_v.append(v)
            if i == cfg.memory_layer:
                if return_stats:
                    x, feat, stats = self.cms_read(x, mems, mem_keys, return_stats=True)
                else:
                    x, feat = self.cms_read(x, mems, mem_keys)
        if logits_from is not None:
            x = x[:, logits_from:]
        logits = self.lm_head(self.model.norm(x))
        if return_stats:
            return logits, new_k, new_v, feat, stats
        return logits, new_k, new_v, feat


class TorchStream:
    """Drives CortexLM.step like the runtime drives the graph: ring writes, a memory event every C tokens.

    Differentiable when built with grad enabled (training backpropagates through memory across chunks).
    """

    def __init__(self, model: CortexLM, batch: int = 1):
        cfg = model.cfg
        self.model, self.cfg, self.batch = model, cfg, batch
        P = cfg.sinks + cfg.window
        self.keys = [torch.zeros(batch, cfg.n_kv_heads, P, cfg.head_dim) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(batch, cfg.n_kv_heads, cfg.head_dim, P) for _ in range(cfg.n_layers)]
        self.mems, self.mem_keys, self.usage = empty_state(cfg.cms, batch)
        self.n = 0  # tokens seen
        self.events = 0
        self.acc = torch.zeros(batch, cfg.cms.event_dim)  # sum of write_feat over the current chunk
        self.event_log: list[dict] = []
        self.read_log: list[dict] | None = None  # set to [] to collect the reader's gate and level mix per piece
        c, R = cfg.cms, cfg.cms.rows
        rl = c.row_layers(cfg.n_layers)  # the row level (runtime/rows.py), fp32 here
        self.row_k = [torch.zeros(batch, cfg.n_kv_heads, R, cfg.head_dim) for _ in rl]
        self.row_v = [torch.zeros(batch, cfg.n_kv_heads, cfg.head_dim, R) for _ in rl]
        self.row_usage = torch.zeros(batch, R)
        self.row_token = torch.full((batch, R), -1, dtype=torch.long)
        self.row_pending = torch.zeros(batch, 2 * c.chunk)  # the previous and the current chunk
        self.row_writes: list[tuple[int, int, float]] = []

    def row_keys_read(self) -> list[torch.Tensor]:
        """The row keys as the attention reads them. A slot's key is stored rotated at S + W - 1 - (R - j); with
        rows_place "recency" the held rows are read in token order, the k-th newest at S + W - 2 - rows_gap - k."""
        cfg = self.cfg
        if cfg.cms.rows_place == "slot":
            return self.row_k
        S, W, R = cfg.sinks, cfg.window, cfg.cms.rows
        out = [k.clone() for k in self.row_k]
        for b in range(self.batch):
            held = [j for j in range(R) if int(self.row_token[b, j]) >= 0]
            for k, j in enumerate(sorted(held, key=lambda j: -int(self.row_token[b, j]))):
                d = (S + W - 2 - cfg.cms.rows_gap - k) - (S + W - 1 - (R - j))
                cos, sin = rope_cos_sin(torch.tensor(d), cfg.head_dim, cfg.rope_theta, cfg.rope_freq_divisors)
                for i in range(len(out)):
                    out[i][b, :, j] = rotate(self.row_k[i][b, :, j], cos, sin)
        return out

    def piece(self, ids: torch.Tensor):
        """ids (B, T), not crossing a chunk boundary -> logits (B, T, V)"""
        cfg = self.cfg
        T = ids.shape[1]
        plan = ring.plan_step(self.n, T, cfg.sinks, cfg.window)
        t = {k: torch.from_numpy(getattr(plan, k)) for k in ("q_pos", "sink_q_pos", "attn_mask")}
        rows = {}
        if cfg.cms.rows:
            a = torch.arange(self.n, self.n + T)
            tok = self.row_token
            rows = {"row_keys": self.row_keys_read(), "row_values": self.row_v,  # (T, R), batch 1's per stream
                    "row_mask": torch.where((tok[0][None, :] >= 0) & (a[:, None] - tok[0][None, :] >= cfg.window),
                                            0.0, float(ring.NEG_INF))}
            assert self.batch == 1 or not torch.any(tok >= 0), "rows reads are batch 1 (training caches its own)"
        out = self.model.step(ids, t["q_pos"], t["sink_q_pos"], t["attn_mask"],
                              self.keys, self.values, self.mems, self.mem_keys, return_stats=self.read_log is not None,
                              **rows)
        logits, nk, nv, feat = out[:4]
        if self.read_log is not None:
            self.read_log.append(out[4])
        slots = torch.from_numpy(plan.slots)
        # later tokens overwrite earlier ones in the same slot only if T > W, which plan_step forbids
        self.keys = [k.index_copy(2, slots, n) for k, n in zip(self.keys, nk)]
        self.values = [v.index_copy(3, slots, n) for v, n in zip(self.values, nv)]
        shift = ring.frame_shift(self.n, self.n + T, cfg.sinks, cfg.window)
        if shift:  # the ring's rotary frame moved: rotate its keys back by as much (sinks stay)
            cos, sin = rope_cos_sin(torch.tensor(-shift), cfg.head_dim, cfg.rope_theta, cfg.rope_freq_divisors)
            self.keys = [torch.cat([k[:, :, :cfg.sinks], rotate(k[:, :, cfg.sinks:], cos, sin)], dim=2)
                         for k in self.keys]
        for i in range(T):  # token by token, the same summation order as the runtime
            self.acc = self.acc + feat[:, i]
        if cfg.cms.rows:
            c0 = cfg.cms.chunk + self.n % cfg.cms.chunk
            self.row_pending[:, c0:c0 + T] = self.model.cms_write.rows.gates(feat.detach())
        self.n += T
        if cfg.cms.rows and self.n % cfg.cms.chunk == 0:
            rl = cfg.cms.row_layers(cfg.n_layers)
            before = self.row_token.clone()
            self.model.cms_write.rows.event(
                self.row_k, self.row_v, self.row_usage, self.row_token, self.row_pending,
                [self.keys[i] for i in rl], [self.values[i] for i in rl], self.n, cfg,
                lambda x, d: rotate(x, *rope_cos_sin(torch.tensor(d), cfg.head_dim, cfg.rope_theta,
                                                     cfg.rope_freq_divisors)))
            changed = torch.nonzero(self.row_token[0] != before[0]).flatten().tolist()
            self.row_writes += [(int(self.row_token[0, j]), j, float(self.row_usage[0, j])) for j in changed]
        if self.n % cfg.cms.chunk == 0:
            self.events += 1
            s = self.acc / cfg.cms.chunk
            self.mems, self.mem_keys, self.usage, info = self.model.cms_write.event_step(
                self.mems, self.mem_keys, self.usage, s, self.events)
            self.event_log.append(info)
            self.acc = torch.zeros_like(self.acc)
        return logits

    def feed(self, ids: torch.Tensor, max_piece: int | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V). max_piece=1 feeds token by token."""
        out = []
        pos = 0
        for n in ring.split_pieces(self.n, ids.shape[1], self.cfg.cms.chunk):
            parts = [n] if max_piece is None else [min(max_piece, n - j) for j in range(0, n, max_piece)]
            for p in parts:
                out.append(self.piece(ids[:, pos:pos + p]))
                pos += p
        return torch.cat(out, dim=1)


def build(cfg: ModelConfig, seed: int = 0) -> CortexLM:
    return CortexLM(cfg).init_weights(seed).eval()

