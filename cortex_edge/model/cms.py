"""The CMS in plain PyTorch: the read injected every token, and the reference jump map.

The read (CMSReader) runs inside the exported graph. The write (CMSWriter.event_step) is the slow,
obvious reference of runtime/cms.py, which is what the Pi steps; tests hold them together on
output and state. Both are batched over B independent streams (training); the runtime has B = 1.
What this leaves out: the transformer (llama.py) and when events happen (lm.py).

Read, per token, from the hidden state h after block `memory_layer`:

    h ─► n = RMSNorm(h) ─► q = W_q n ──► per level: α_l = softmax(K_l q / √d_k),  c_l = α_lᵀ M_l
                     │                    β = softmax(W_β [c_0 ‖ … ‖ c_L])          (mixing across levels)
                     │                    c = RMSNorm(Σ_l β_l U_l c_l)               (norm around the read)
                     │                    γ = sigmoid((w_γ·[n ‖ c] + b_γ) / max(τ, 0.1))  (gate, temperature τ)
                     │                    h' = h + γ · W_o c        W_o = 0 at init: h' == h exactly
                     └─► write_feat = W_c n                          (compressor, the jump map's input)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cortex_edge.config import CMSConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class CMSReader(nn.Module):
    def __init__(self, dim: int, cfg: CMSConfig, eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        self.norm_in = RMSNorm(dim, eps)
        self.query = nn.Linear(dim, cfg.key_dim, bias=False)
        self.mix = nn.Linear(sum(cfg.widths), cfg.levels, bias=True)  # W_β
        self.up = nn.ModuleList(nn.Linear(w, dim, bias=False) for w in cfg.widths)  # U_l
        self.norm_out = RMSNorm(dim, eps)
        self.gate = nn.Linear(2 * dim, 1, bias=True)
        self.temperature = nn.Parameter(torch.ones(1))
        self.out = nn.Linear(dim, dim, bias=False)  # W_o, zero at init
        self.compress = nn.Linear(dim, cfg.event_dim, bias=False)  # W_c
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.gate.bias, -1.0)  # favour the backbone's own path at the start

    def read_levels(self, q: torch.Tensor, mems: list[torch.Tensor], keys: list[torch.Tensor]) -> list[torch.Tensor]:
        """q (B, T, d_k) -> per level c_l = softmax(K_l q / √d_k)ᵀ M_l, (B, T, d_l)"""
        scale = 1.0 / math.sqrt(self.cfg.key_dim)
        return [torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), m)
                for m, k in zip(mems, keys)]

    def forward(self, h: torch.Tensor, mems: list[torch.Tensor], keys: list[torch.Tensor],
                return_stats: bool = False):
        """h (B, T, D); mems[l] (B, N_l, d_l); keys[l] (B, N_l, d_k) -> h' (B, T, D), write_feat (B, T, d_z)"""
        n = self.norm_in(h)
        ctx = self.read_levels(self.query(n), mems, keys)
        beta = torch.softmax(self.mix(torch.cat(ctx, dim=-1)), dim=-1)  # (B, T, L+1)
        c = sum(beta[..., i:i + 1] * up(cl) for i, (up, cl) in enumerate(zip(self.up, ctx)))  # (B, T, D)
        c = self.norm_out(c)
        gamma = torch.sigmoid(self.gate(torch.cat([n, c], dim=-1)) / self.temperature.clamp(min=0.1))  # (B, T, 1)
        h2 = h + gamma * self.out(c)
        feat = self.compress(n)  # (B, T, d_z)
        if return_stats:
            return h2, feat, {"gate": gamma, "beta": beta, "read": c}
        return h2, feat


class WriteLevel(nn.Module):
    def __init__(self, cfg: CMSConfig, level: int):
        super().__init__()
        in_dim = cfg.event_dim + (cfg.widths[level - 1] if level > 0 else 0)
        self.z = nn.Linear(in_dim, cfg.event_dim, bias=True)
        self.gate = nn.Linear(cfg.event_dim, 1, bias=True)
        self.value = nn.Linear(cfg.event_dim, cfg.widths[level], bias=False)
        self.key = nn.Linear(cfg.event_dim, cfg.key_dim, bias=False)
        self.decay = nn.Linear(cfg.event_dim, 1, bias=True)


class RowWriter(nn.Module):
    """The row level's write gate and its jump map, the obvious way (runtime/rows.py is the Pi's path)."""

    def __init__(self, cfg: CMSConfig):
        super().__init__()
        self.cfg = cfg
        self.z = nn.Linear(cfg.event_dim, cfg.event_dim, bias=True)
        self.gate = nn.Linear(cfg.event_dim, 1, bias=True)

    def gates(self, feat: torch.Tensor) -> torch.Tensor:
        """feat (B, T, d_z) -> g (B, T)"""
        return torch.sigmoid(self.gate(torch.tanh(self.z(feat))))[..., 0]

    @torch.no_grad()
    def event(self, row_k: list[torch.Tensor], row_v: list[torch.Tensor], usage: torch.Tensor, token: torch.Tensor,
              pending: torch.Tensor, ring_k: list[torch.Tensor], ring_v: list[torch.Tensor], n: int, mcfg, rotate_by):
        """At the event ending the chunk before token n, commit the chunk before that one (each token kept with the
        strongest gate among it and the next rows_lookahead tokens). row_k[i], row_v[i] (B, KV, R, hd), usage (B, R),
        token (B, R) long, pending (B, 2C): the previous and the current chunk's gates; buf_k[i], buf_v[i]
        (B, KV, M, hd) the row layers' buffers as the chunk that just ended left them (runtime/ring.py), keys
        rotated in its frame; rotate_by(x, delta) rotates x by delta positions. Tensors are changed in place."""
        from cortex_edge.runtime import ring

        cfg = self.cfg
        S, W, R = mcfg.sinks, mcfg.window, cfg.rows
        lay = ring.Layout.of(mcfg)
        c0 = n - cfg.chunk  # the chunk that just ended: its layout holds the tokens
        f = lay.frame(c0)
        for b in range(usage.shape[0]):
            for t in range(cfg.chunk):
                a = n - 2 * cfg.chunk + t
                g = max(float(x) for x in pending[b, t:t + cfg.rows_lookahead + 1])
                if a < S or not g > cfg.rows_threshold:
                    continue
                j = int(torch.argmin(usage[b]))
                if not float(usage[b, j]) < g:
                    continue
                slot = int(lay.index(a, c0))
                delta = (S + W - 1 - (R - j)) - (a - f)
                for i in range(len(row_k)):
                    row_k[i][b, :, j] = rotate_by(ring_k[i][b, :, slot], delta)
                    row_v[i][b, :, j] = ring_v[i][b, :, slot]
                usage[b] *= 1.0 - cfg.rows_decay
                usage[b, j] = g
                token[b, j] = a
        pending[:, :cfg.chunk] = pending[:, cfg.chunk:].clone()
        pending[:, cfg.chunk:] = 0.0


class CMSWriter(nn.Module):
    """Write heads + the reference jump map. Parameter names are the keys of contract.CMS_WRITE_WEIGHTS."""

    def __init__(self, cfg: CMSConfig):
        super().__init__()
        self.cfg = cfg
        self.query = nn.Linear(cfg.event_dim, cfg.key_dim, bias=False)
        self.levels = nn.ModuleList(WriteLevel(cfg, i) for i in range(cfg.levels))
        self.rows = RowWriter(cfg) if cfg.rows else None

    def read(self, mem: torch.Tensor, keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """mem (B, N, d), keys (B, N, d_k), q (B, d_k) -> (B, d)"""
        att = torch.softmax(torch.einsum("bnk,bk->bn", keys, q) / math.sqrt(self.cfg.key_dim), dim=-1)
        return torch.einsum("bn,bnd->bd", att, mem)

    def address(self, keys: torch.Tensor, usage: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, N) write weights, ||a||_2 <= 1"""
        content = torch.softmax(torch.einsum("bnk,bk->bn", keys, k) / math.sqrt(self.cfg.key_dim), dim=-1)
        if self.cfg.addressing == "content":
            return content
        lru = F.one_hot(torch.argmin(usage, dim=-1), usage.shape[-1]).to(content.dtype)
        if self.cfg.addressing == "lru":
            return lru
        return self.cfg.hybrid_mix * content + (1.0 - self.cfg.hybrid_mix) * lru

    def due(self, level: int, event: int) -> bool:
        """Level l steps on every write_every[l]-th event (consolidation at fixed intervals)."""
        return event % self.cfg.write_every[level] == 0

    def decay(self, head: WriteLevel, z: torch.Tensor, g: torch.Tensor, level: int) -> torch.Tensor:
        """(B, 1) decay of this write: fixed d_l, or adaptive in [d_min, d_max]."""
        cfg = self.cfg
        if cfg.adaptive_decay:
            return cfg.decay_min + (cfg.decay_max - cfg.decay_min) * torch.sigmoid(head.decay(z))
        return torch.full_like(g, cfg.decay[level])

    def event_step(self, mems: list[torch.Tensor], keys: list[torch.Tensor], usage: list[torch.Tensor],
                   s: torch.Tensor, event: int):
        """One memory event, as written in the CMS note, level by level. s (B, d_z). Returns new lists + info."""
        cfg = self.cfg
        mems, keys, usage = list(mems), list(keys), list(usage)
        q_w = self.query(s)  # (B, d_k)
        info = {"gate": [], "decay": []}
        for lvl, head in enumerate(self.levels):
            if not self.due(lvl, event):
                info["gate"].append(None)
                info["decay"].append(None)
                continue
            x = s if lvl == 0 else torch.cat([s, self.read(mems[lvl - 1], keys[lvl - 1], q_w)], dim=-1)
            z = torch.tanh(head.z(x))  # (B, d_z)
            g = torch.sigmoid(head.gate(z))  # (B, 1)
            if cfg.write_threshold > 0:  # sparse write: below the threshold nothing is written
                g = torch.relu(g - cfg.write_threshold) / (1.0 - cfg.write_threshold)
            v = head.value(z)  # (B, d_l)
            k = head.key(z)  # (B, d_k)
            d = self.decay(head, z, g, lvl)  # (B, 1)
            a = self.address(keys[lvl], usage[lvl], k)  # (B, N)
            keep = (1.0 - d).unsqueeze(-1)  # (B, 1, 1)
            m = keep * mems[lvl]
            kk = keep * keys[lvl]
            if cfg.delta_rule:
                v = v - torch.einsum("bn,bnd->bd", a, m)
                k = k - torch.einsum("bn,bnk->bk", a, kk)
            mems[lvl] = m + g.unsqueeze(-1) * torch.einsum("bn,bd->bnd", a, v)
            keys[lvl] = kk + g.unsqueeze(-1) * torch.einsum("bn,bk->bnk", a, k)
            usage[lvl] = (1.0 - d) * usage[lvl] + (g > 0).to(a.dtype) * a  # only writes move the LRU pointer
            info["gate"].append(g)
            info["decay"].append(d)
        return mems, keys, usage, info

    def numpy_weights(self) -> dict:
        return {name: p.detach().float().cpu().numpy().copy() for name, p in self.named_parameters()}


def empty_state(cfg: CMSConfig, batch: int = 1, dtype=torch.float32):
    mems = [torch.zeros(batch, n, d, dtype=dtype) for n, d in zip(cfg.slots, cfg.widths)]
    keys = [torch.zeros(batch, n, cfg.key_dim, dtype=dtype) for n in cfg.slots]
    usage = [torch.zeros(batch, n, dtype=dtype) for n in cfg.slots]
    return mems, keys, usage
