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
    """RoPE in HF's layout (the exported graph rotates inside GroupQueryAttention: _ExportedGQA)."""
    return x * cos + rotate_half(x) * sin


class RopeTables(NamedTuple):
    """The rotation while exporting: positions (1, T) into cos/sin tables (P, hd/2) over positions 0..P - 1,
    holding exactly rope_cos_sin's fp32 values."""
    pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class GraphLengths(NamedTuple):
    """The buffer rows in use after the step while exporting, as GroupQueryAttention takes them: seqlens_k (1,)
    int32 = total - 1, total () int32. (The reference takes a Python int.)"""
    seqlens_k: torch.Tensor
    total: torch.Tensor


def kv_round(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x as an 8-bit cache holds it, in steps of s (quantize/kv_cache.py)."""
    return torch.clamp(torch.round(x / s), -128, 127) * s


def kv_quantize(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x as the cache's int8 steps of s (the same steps as kv_round's)."""
    return torch.clamp(torch.round(x / s), -128, 127).to(torch.int8)


def kv_dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """An 8-bit cache's int8 rows as the attention reads them."""
    return q.to(torch.float32) * s


def gqa_reference(q, k, v, buf_k, buf_v, total: int, bias, scale: float, kv_scale=None):
    """What onnxruntime's GroupQueryAttention computes over a shared buffer, in plain torch.
    q (B, H, T, hd), k, v (B, KV, T, hd) rotated; buf_k, buf_v (B, KV, M, hd); bias (1 or B, 1, T, total).
    The new keys and values are written at rows total - T .. total - 1, and every query attends to rows
    0 .. total - 1 (visibility is the bias). Head h reads KV head h // (H / KV) (HF repeat_kv).
    kv_scale: (key scale, value scale) (1, KV, 1, hd) of an 8-bit cache: the buffers are int8, the new rows
    stored rounded and read back rounded, their own included.
    Returns the output (B, T, H * hd) and the buffers with the new rows written."""
    if kv_scale is not None:
        ks, vs = kv_scale
        o, pk, pv = gqa_reference(q, kv_round(k, ks), kv_round(v, vs), kv_dequantize(buf_k, ks),
                                  kv_dequantize(buf_v, vs), total, bias, scale)
        return o, kv_quantize(pk, ks), kv_quantize(pv, vs)
    B, H, T, hd = q.shape
    p0 = total - T
    pk = torch.cat([buf_k[:, :, :p0], k, buf_k[:, :, total:]], dim=2)  # (B, KV, M, hd)
    pv = torch.cat([buf_v[:, :, :p0], v, buf_v[:, :, total:]], dim=2)
    G = H // k.shape[1]
    kk = pk[:, :, :total].repeat_interleave(G, dim=1)  # (B, H, total, hd)
    vv = pv[:, :, :total].repeat_interleave(G, dim=1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale + bias  # (B, H, T, total)
    o = torch.matmul(torch.softmax(s, dim=-1), vv)  # (B, H, T, hd)
    return o.transpose(1, 2).reshape(B, T, H * hd), pk, pv


class _ExportedGQA(torch.autograd.Function):
    """The attention, exported as one com.microsoft GroupQueryAttention node: packed q/k/v in, rotary inside
    (position_ids, cos/sin tables), past and present the same buffer (the runtime binds them to one OrtValue, so
    the kernel writes the new rows in place), visibility as attention_bias. Export only; the reference and
    training run gqa_reference."""

    @staticmethod
    def forward(ctx, qkv, buf_k, buf_v, seqlens_k, total, pos, cos_t, sin_t, bias, n_heads, kv_heads, ks=None,
                vs=None):
        B, T, _ = qkv.shape
        hd = buf_k.shape[-1]
        x = qkv.view(B, T, n_heads + 2 * kv_heads, hd).transpose(1, 2)
        cos, sin = rope_of(RopeTables(pos, cos_t, sin_t))
        q, k, v = x.split([n_heads, kv_heads, kv_heads], dim=1)
        return gqa_reference(rotate(q, cos, sin), rotate(k, cos, sin), v, buf_k, buf_v, int(total), bias,
                             1.0 / math.sqrt(hd), None if ks is None else (ks, vs))

    @staticmethod
    def symbolic(g, qkv, buf_k, buf_v, seqlens_k, total, pos, cos_t, sin_t, bias, n_heads, kv_heads, ks=None,
                 vs=None):
        from torch.onnx import symbolic_helper as sh
        none = sh._optional_input_placeholder_tensor(g)
        hd = buf_k.type().sizes()[-1]
        int8 = {}  # the 8-bit cache (quantize/kv_cache.py): static scales, inputs 12 and 13 after head_sink
        if ks is not None:
            int8 = dict(k_quant_type_s="PER_CHANNEL", v_quant_type_s="PER_CHANNEL", kv_cache_bit_width_i=8)
        scales = [] if ks is None else [none, ks, vs]
        if hd % 16 == 0:  # rotary inside the kernel, which takes only head sizes that are multiples of 16
            out, pk, pv = g.op("com.microsoft::GroupQueryAttention", qkv, none, none, buf_k, buf_v, seqlens_k, total,
                               cos_t, sin_t, pos, bias, *scales, num_heads_i=n_heads, kv_num_heads_i=kv_heads,
                               do_rotary_i=1, rotary_interleaved_i=0, outputs=3, **int8)
        else:  # the same maths, the rotation as its own kernel first (3 more operators a layer)
            qk_size = g.op("Constant", value_t=torch.tensor([(n_heads + kv_heads) * hd, kv_heads * hd]))
            qk, v = g.op("Split", qkv, qk_size, axis_i=-1, outputs=2)
            qk = g.op("com.microsoft::RotaryEmbedding", qk, pos, cos_t, sin_t, interleaved_i=0,
                      num_heads_i=n_heads + kv_heads)
            q_size = g.op("Constant", value_t=torch.tensor([n_heads * hd, kv_heads * hd]))
            q, k = g.op("Split", qk, q_size, axis_i=-1, outputs=2)
            out, pk, pv = g.op("com.microsoft::GroupQueryAttention", q, k, v, buf_k, buf_v, seqlens_k, total,
                               none, none, none, bias, *scales, num_heads_i=n_heads, kv_num_heads_i=kv_heads,
                               do_rotary_i=0, outputs=3, **int8)
        for t, like in ((pk, buf_k), (pv, buf_v)):
            t.setType(like.type())
        sizes = qkv.type().varyingSizes()  # (B, T, (H + 2 KV) hd), B and T possibly symbolic
        out.setType(qkv.type().with_sizes(sizes[:-1] + [n_heads * hd]))
        return out, pk, pv


class _ExportedSkipNorm(torch.autograd.Function):
    """norm(x + skip) and x + skip, exported as one com.microsoft SkipSimplifiedLayerNormalization node (the
    residual add and the next RMSNorm: onnxruntime's own optimizer does not fuse them on CPU). Export only."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps):
        s = x + skip
        sf = s.float()
        return weight * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype), s

    @staticmethod
    def symbolic(g, x, skip, weight, eps):
        y, _, _, s = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, weight, epsilon_f=eps,
                          outputs=4)
        y.setType(x.type())
        s.setType(x.type())
        return y, s


def skip_norm(x: torch.Tensor, skip: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + skip), x + skip): the residual add and the RMSNorm after it (skip None: norm(x), x)."""
    if skip is None:
        return norm(x), x
    if torch.onnx.is_in_onnx_export():
        return _ExportedSkipNorm.apply(x, skip, norm.weight, norm.eps)
    s = x + skip
    return norm(s), s


def ropes_at(positions: list[torch.Tensor], head_dim: int, theta: float, max_pos: int,
             divisors: tuple[float, ...] = ()) -> list:
    """The rotation at each positions tensor (1, T): cos, sin (T, hd) for rotate(); while exporting, RopeTables
    sharing one pair of tables over positions 0..max_pos (the graph then holds the tables, not the
    trigonometry; onnxruntime refuses a position beyond them)."""
    if not torch.onnx.is_in_onnx_export():
        return [rope_cos_sin(pos[0], head_dim, theta, divisors) for pos in positions]
    cos, sin = rope_cos_sin(torch.arange(max_pos + 1), head_dim, theta, divisors)
    h = head_dim // 2
    cos, sin = cos[:, :h].contiguous(), sin[:, :h].contiguous()
    return [RopeTables(pos, cos, sin) for pos in positions]


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
        # an 8-bit attention cache (CortexLM.with_kv_cache): (key scale, value scale) (1, KV, 1, hd); the buffers
        # are then int8 in both forms, and the new rows are rounded before anything reads them
        self.kv_scale: tuple[torch.Tensor, torch.Tensor] | None = None

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

    def forward(self, x, q_rope, sink_rope, bias, buf_k, buf_v, total, fixed: int, gqa: bool = False):
        """x (B, T, D); q_rope, sink_rope: ropes_at's rotations at the new tokens' positions and at their sink
        positions; buf_k, buf_v (B, KV, M, hd): the layer's buffer (runtime/ring.py: [rows | sinks | recent
        tokens], keys stored rotated); total: the rows in use once the new tokens are written at
        total - T .. total - 1 (an int; GraphLengths while exporting); bias (1, 1, T, total) additive;
        fixed: R + S, the buffer rows read from the sink position (given by the model: a sidecar attached
        after this module was built changes R).

        Two forms of the same maths (contract.py):
          gqa=False  the exact form, every T (the chunk graph, and the reference): the recent tokens seen from
                     each query's position, the sinks and rows (stored in the sinks' own frame) from each
                     query's sink position: two rotations of the query, two score matmuls, one softmax.
                     Returns the output, the new keys (rotated) and values (B, KV, T, hd): the caller writes them.
          gqa=True   one GroupQueryAttention over the buffer, written in place (the decode graph, T = 1): the
                     kernel rotates the query once, so the runtime has written the sinks and rows rotated to
                     the token's own frame first (ring.sink_delta); then this is the exact form's maths.
                     Returns the output and the buffers with the new rows written."""
        cfg = self.cfg
        B = graph_batch(x)
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # (B, T, (H + 2KV) hd)
        kvs = self.kv_scale
        if gqa and isinstance(q_rope, RopeTables):
            o, pk, pv = _ExportedGQA.apply(qkv, buf_k, buf_v, total.seqlens_k, total.total, q_rope.pos, q_rope.cos,
                                           q_rope.sin, bias, H, KV, *(kvs or ()))
            return self.o_proj(o), pk, pv
        if isinstance(total, GraphLengths) and not torch.onnx.is_in_onnx_export():
            total = int(total.total)  # the graph module run eagerly (export validation)
        q, k, v = qkv.view(B, -1, H + 2 * KV, hd).transpose(1, 2).split([H, KV, KV], dim=1)  # (B, *, T, hd)
        qc = rope_of(q_rope)
        qr, k = rotate(q, *qc), rotate(k, *qc)
        if gqa:
            o, pk, pv = gqa_reference(qr, k, v, buf_k, buf_v, total, bias, 1.0 / math.sqrt(hd), kvs)
            return self.o_proj(o), pk, pv
        if kvs is not None:  # the 8-bit cache: the new rows rounded as they will be stored, then read
            k, v = kv_round(k, kvs[0]), kv_round(v, kvs[1])
        o = exact_attention(qr, rotate(q, *rope_of(sink_rope)), k, v, buf_k, buf_v, total, bias, fixed,
                            1.0 / math.sqrt(hd), kvs)
        if kvs is not None:
            k, v = kv_quantize(k, kvs[0]), kv_quantize(v, kvs[1])
        return self.o_proj(o), k, v


def rope_of(r):
    """cos, sin (T, hd) of a rotation: ropes_at's pair, or gathered from its tables while exporting."""
    if isinstance(r, RopeTables):
        cos, sin = r.cos[r.pos[0]], r.sin[r.pos[0]]
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return r


class _ExportedHead(torch.autograd.Function):
    """buf[:, :, :total - T] with total a graph tensor (a traced slice would freeze it). Export only."""

    @staticmethod
    def forward(ctx, buf, total, new):
        return buf[:, :, :int(total) - new.shape[2]]

    @staticmethod
    def symbolic(g, buf, total, new):
        t = g.op("Gather", g.op("Shape", new), g.op("Constant", value_t=torch.tensor([2])))
        end = g.op("Sub", g.op("Reshape", g.op("Cast", total, to_i=7), g.op("Constant", value_t=torch.tensor([1]))), t)
        out = g.op("Slice", buf, g.op("Constant", value_t=torch.tensor([0])), end,
                   g.op("Constant", value_t=torch.tensor([2])))
        return out


def exact_attention(q, qs, k, v, buf_k, buf_v, total, bias, fixed: int, scale: float, kv_scale=None):
    """The exact form of the attention. q, qs (B, H, T, hd): the queries rotated at their positions and at their
    sink positions; k, v (B, KV, T, hd) the new tokens' (k rotated); buf_k, buf_v (B, KV, M, hd), rows
    0 .. total - T - 1 in use before them; the first `fixed` rows (rows and sinks, in the sinks' own frame) are
    scored with qs, the rest with q. bias (1, 1, T, total). Head h reads KV head h // (H / KV) (HF repeat_kv).
    kv_scale: (key scale, value scale) (1, KV, 1, hd) of an 8-bit cache, whose int8 rows in use are read as
    q * scale. Returns the output (B, T, H * hd)."""
    B, (H, T, hd), KV = graph_batch(q), q.shape[1:], k.shape[1]
    G = H // KV
    if isinstance(total, GraphLengths):
        pk, pv = _ExportedHead.apply(buf_k, total.total, k), _ExportedHead.apply(buf_v, total.total, v)
    else:
        pk, pv = buf_k[:, :, :total - T], buf_v[:, :, :total - T]
    if kv_scale is not None:  # only the rows in use
        pk, pv = kv_dequantize(pk, kv_scale[0]), kv_dequantize(pv, kv_scale[1])
    keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, KV, total, hd)
    q, qs = q.reshape(B, KV, -1, hd), qs.reshape(B, KV, -1, hd)  # head kv * G + g, token t: row g * T + t
    s = torch.cat([torch.matmul(qs, keys[:, :, :fixed].transpose(-1, -2)),
                   torch.matmul(q, keys[:, :, fixed:].transpose(-1, -2))], dim=-1) * scale + bias.repeat(1, 1, G, 1)
    o = torch.matmul(torch.softmax(s, dim=-1), values)  # (B, KV, G * T, hd)
    return o.reshape(B, H, -1, hd).transpose(1, 2).reshape(B, -1, H * hd)


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

    def forward(self, x, pending, q_rope, sink_rope, bias, buf_k, buf_v, total, fixed: int, gqa: bool = False):
        """x: the residual stream without `pending`, the block before's MLP output still to be added (None: x is
        whole); each residual add goes with the norm after it (skip_norm). Returns x (without the MLP output),
        the MLP output, and the buffers."""
        h, x = skip_norm(x, pending, self.input_layernorm)
        a, k, v = self.self_attn(h, q_rope, sink_rope, bias, buf_k, buf_v, total, fixed, gqa)
        h, x = skip_norm(x, a, self.post_attention_layernorm)
        return x, self.mlp(h), k, v


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

    def with_kv_cache(self, scales: list[tuple] | None) -> CortexLM:
        """A copy keeping its attention buffers in 8 bits: scales [(key scale, value scale) (KV, hd)] a layer
        (quantize/kv_cache.py; None: fp32 buffers). The exported graph, TorchStream and the runtime then hold int8
        buffers and round every row they write."""
        import copy

        m = copy.deepcopy(self)
        for layer, sc in zip(m.model.layers, scales or [None] * len(m.model.layers)):
            layer.self_attn.kv_scale = None if sc is None else tuple(
                torch.as_tensor(x, dtype=torch.float32).reshape(1, self.cfg.n_kv_heads, 1, self.cfg.head_dim)
                for x in sc)
        return m

    @property
    def kv_scales(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """[(key scale, value scale) (1, KV, 1, hd)] a layer of an 8-bit attention cache, or None."""
        s = [layer.self_attn.kv_scale for layer in self.model.layers]
        return None if s[0] is None else s

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

    def step(self, input_ids, q_pos, sink_pos, bias, row_bias, total, buf_keys, buf_values, mems, mem_keys,
             return_stats: bool = False, logits_from: torch.Tensor | None = None, gqa: bool = False):
        """The graph. input_ids (B, T); q_pos, sink_pos (1, T): each token's position and sink position
        (runtime/ring.py); bias, row_bias (1, 1, T, total): visibility in the layers
        without and with the row level (runtime/ring.py; row_bias None without a row level); total: buffer rows in
        use after the step (int, or GraphLengths while exporting); buf_keys[i], buf_values[i] (B, KV, M, hd) the
        layers' buffers, keys stored rotated; mems[l] (B, N_l, d_l); mem_keys[l] (B, N_l, d_k).
        logits_from: () int64, logits of tokens logits_from.. only (None: all).
        gqa: the attention's form (Attention.forward): False, the exact form; True, GroupQueryAttention's
        (T = 1, the sinks and rows written into the buffers rotated to the token's frame, sink_pos unused).
        Returns logits (B, T, V), the new tokens' keys and values (B, KV, T, hd) (gqa: the buffers with them
        written), and write_feat (B, T, d_z)."""
        cfg = self.cfg
        lay = ring.Layout.of(cfg)  # tables over every position, and at least the buffer's rows (onnxruntime asks so)
        q_rope, sink_rope = ropes_at([q_pos, sink_pos], cfg.head_dim, cfg.rope_theta, max(lay.max_position, lay.capacity),
                             cfg.rope_freq_divisors)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        new_k, new_v, feat, stats, pending = [], [], None, None, None
        rl = cfg.cms.row_layers(cfg.n_layers)
        for i, layer in enumerate(self.model.layers):
            b = row_bias if i in rl else bias
            x, pending, k, v = layer(x, pending, q_rope, sink_rope, b, buf_keys[i], buf_values[i], total,
                                     lay.rows + cfg.sinks, gqa)
            new_k.append(k)
            new_v.append(v)
            if i == cfg.memory_layer:
                x, pending = x + pending, None  # the read takes the block's whole output
                if return_stats:
                    x, feat, stats = self.cms_read(x, mems, mem_keys, return_stats=True)
                else:
                    x, feat = self.cms_read(x, mems, mem_keys)
        h, _ = skip_norm(x, pending, self.model.norm)
        if logits_from is not None:
            h = h[:, logits_from:]
        logits = self.lm_head(h)
        if return_stats:
            return logits, new_k, new_v, feat, stats
        return logits, new_k, new_v, feat


class TorchStream:
    """Drives CortexLM.step like the runtime drives the graph, in the exact form of the attention throughout: the
    buffers of runtime/ring.py (moved, re-rotated and given their rows at each chunk start), the new rows written
    after each piece, a memory event every C tokens.

    Differentiable when built with grad enabled (training backpropagates through memory across chunks).
    """

    def __init__(self, model: CortexLM, batch: int = 1):
        cfg = model.cfg
        self.model, self.cfg, self.batch = model, cfg, batch
        self.lay = ring.Layout.of(cfg)
        M = self.lay.capacity
        self.kv = model.kv_scales  # an 8-bit cache: int8 buffers, every row written rounded (kv_quantize)
        dt = torch.float32 if self.kv is None else torch.int8
        self.keys = [torch.zeros(batch, cfg.n_kv_heads, M, cfg.head_dim, dtype=dt) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(batch, cfg.n_kv_heads, M, cfg.head_dim, dtype=dt) for _ in range(cfg.n_layers)]
        self.prepared = -1  # the chunk start the buffers are laid out for
        self.mems, self.mem_keys, self.usage = empty_state(cfg.cms, batch)
        self.n = 0  # tokens seen
        self.events = 0
        self.acc = torch.zeros(batch, cfg.cms.event_dim)  # sum of write_feat over the current chunk
        self.event_log: list[dict] = []
        self.read_log: list[dict] | None = None  # set to [] to collect the reader's gate and level mix per piece
        c, R = cfg.cms, cfg.cms.rows
        rl = c.row_layers(cfg.n_layers)  # the row level (runtime/rows.py), fp32 here
        self.row_k = [torch.zeros(batch, cfg.n_kv_heads, R, cfg.head_dim) for _ in rl]
        self.row_v = [torch.zeros(batch, cfg.n_kv_heads, R, cfg.head_dim) for _ in rl]
        self.row_usage = torch.zeros(batch, R)
        self.row_token = torch.full((batch, R), -1, dtype=torch.long)
        self.row_pending = torch.zeros(batch, 2 * c.chunk)  # the previous and the current chunk
        self.row_writes: list[tuple[int, int, float]] = []

    def _rotate(self, x: torch.Tensor, delta: int) -> torch.Tensor:
        cfg = self.cfg
        return rotate(x, *rope_cos_sin(torch.tensor(delta), cfg.head_dim, cfg.rope_theta, cfg.rope_freq_divisors))

    def _stored(self, x: torch.Tensor, i: int, which: int) -> torch.Tensor:
        """x (fp32) as layer i's buffer holds it: itself, or int8 in an 8-bit cache (which: 0 keys, 1 values)."""
        return x if self.kv is None else kv_quantize(x, self.kv[i][which])

    def _read(self, x: torch.Tensor, i: int, which: int) -> torch.Tensor:
        """Layer i's buffer x as fp32."""
        return x if self.kv is None else kv_dequantize(x, self.kv[i][which])

    def row_keys_read(self) -> list[torch.Tensor]:
        """The row keys in the sinks' own frame, as they are read, times rows_key_scale. A slot's key is stored
        rotated at S + W - 1 - (R - j); with rows_place "recency" the held rows are read in token order, the
        k-th newest at S + W - 2 - rows_gap - k."""
        scale = float(self.cfg.cms.rows_key_scale)
        keys = self._row_keys_placed()
        return keys if scale == 1.0 else [k * scale for k in keys]

    def _row_keys_placed(self) -> list[torch.Tensor]:
        cfg = self.cfg
        if cfg.cms.rows_place == "slot":
            return self.row_k
        S, W, R = cfg.sinks, cfg.window, cfg.cms.rows
        out = [k.clone() for k in self.row_k]
        for b in range(self.batch):
            held = [j for j in range(R) if int(self.row_token[b, j]) >= 0]
            for k, j in enumerate(sorted(held, key=lambda j: -int(self.row_token[b, j]))):
                d = (S + W - 2 - cfg.cms.rows_gap - k) - (S + W - 1 - (R - j))
                for i in range(len(out)):
                    out[i][b, :, j] = self._rotate(self.row_k[i][b, :, j], d)
        return out

    def prepare(self) -> None:
        """Lay the buffers out for the chunk the next token is in (runtime/ring.py): move the recent tokens when
        the region's base moves, rotate them when the frame moves, and write the rows (in the sinks' own frame,
        where the exact attention reads them and the sinks). Once per chunk; pieces never cross one."""
        lay, S, R = self.lay, self.cfg.sinks, self.lay.rows
        c0 = ring.chunk_start(self.n, lay.chunk)
        if self.prepared == c0:
            return
        old = max(self.prepared, 0)
        d_base, d_frame = lay.base(c0) - lay.base(old), lay.frame(c0) - lay.frame(old)
        keep = slice(R + S + d_base, None)
        if d_base:  # the oldest d_base tokens of the region are out of every coming query's window
            pad = torch.zeros_like(self.keys[0][:, :, :d_base])
            self.keys = [torch.cat([k[:, :, :R + S], k[:, :, keep], pad], dim=2) for k in self.keys]
            self.values = [torch.cat([v[:, :, :R + S], v[:, :, keep], pad], dim=2) for v in self.values]
        if d_frame:
            self.keys = [torch.cat([k[:, :, :R + S], self._stored(self._rotate(self._read(k[:, :, R + S:], i, 0),
                                                                                -d_frame), i, 0)], dim=2)
                         for i, k in enumerate(self.keys)]
        rl = self.cfg.cms.row_layers(self.cfg.n_layers)
        if R and len(rl):  # the rows in the sinks' own frame (the sinks are stored in it: they never move)
            rk = self.row_keys_read()
            for j, i in enumerate(rl):
                self.keys[i] = torch.cat([self._stored(rk[j], i, 0), self.keys[i][:, :, R:]], dim=2)
                self.values[i] = torch.cat([self._stored(self.row_v[j], i, 1), self.values[i][:, :, R:]], dim=2)
        self.prepared = c0

    def piece(self, ids: torch.Tensor):
        """ids (B, T), not crossing a chunk boundary -> logits (B, T, V)"""
        cfg = self.cfg
        T = ids.shape[1]
        self.prepare()
        row_mask = None
        if cfg.cms.rows:
            a = torch.arange(self.n, self.n + T)
            tok = self.row_token  # (T, R), batch 1's per stream
            row_mask = torch.where((tok[0][None, :] >= 0) & (a[:, None] - tok[0][None, :] >= cfg.window),
                                   float(cfg.cms.rows_bias), float(ring.NEG_INF)).numpy()
            assert self.batch == 1 or not torch.any(tok >= 0), "rows reads are batch 1 (training caches its own)"
        plan = ring.plan_step(self.n, T, self.lay, row_mask)
        out = self.model.step(ids, torch.from_numpy(plan.q_pos), torch.from_numpy(plan.sink_pos),
                              torch.from_numpy(plan.bias),
                              None if plan.row_bias is None else torch.from_numpy(plan.row_bias), plan.total,
                              self.keys, self.values, self.mems, self.mem_keys,
                              return_stats=self.read_log is not None)
        logits, nk, nv, feat = out[:4]
        p0 = plan.total - T  # the new rows go to p0 .. total - 1, as the runtime writes them
        self.keys = [torch.cat([k[:, :, :p0], n, k[:, :, plan.total:]], dim=2) for k, n in zip(self.keys, nk)]
        self.values = [torch.cat([v[:, :, :p0], n, v[:, :, plan.total:]], dim=2) for v, n in zip(self.values, nv)]
        if self.read_log is not None:
            self.read_log.append(out[4])
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
                [self._read(self.keys[i], i, 0) for i in rl], [self._read(self.values[i], i, 1) for i in rl], self.n,
                cfg, self._rotate)
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

