"""The torch model: chunk == token by token, the bounded attention against an obvious reference,
and an untrained sidecar leaving the backbone exactly unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import requires_torch

pytestmark = requires_torch


def _cfg(**kw):
    from cortex_edge.config import CMSConfig, ModelConfig

    base = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, sinks=3,
                window=12, memory_layer=0, rope_theta=10000.0,
                cms=CMSConfig(slots=(4, 8), widths=(8, 16), key_dim=4, event_dim=8, chunk=5, write_every=(1, 2),
                              decay=(0.1, 0.02)))
    base.update(kw)
    return ModelConfig(**base)


def _active(model, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.cms_read.out.weight.copy_(torch.randn(model.cms_read.out.weight.shape, generator=g) * 0.3)
        model.cms_read.gate.bias.fill_(0.0)
    return model


@pytest.mark.parametrize("kw", [dict(), dict(sinks=0), dict(n_kv_heads=4), dict(n_kv_heads=1, tie_embeddings=False),
                                dict(attn_bias=True, memory_layer=1)])
def test_chunk_equals_token_by_token(kw):
    """Logits and every piece of state agree across window wrap-around and several memory events."""
    import torch

    from cortex_edge.model.lm import TorchStream, build

    cfg = _cfg(**kw)
    model = _active(build(cfg, seed=1))
    ids = torch.randint(0, cfg.vocab_size, (1, 61), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = TorchStream(model), TorchStream(model)
        la = a.feed(ids)
        lb = b.feed(ids, max_piece=1)
    assert a.events == b.events == 61 // cfg.cms.chunk >= 3
    assert a.n > cfg.sinks + cfg.window  # the ring wrapped
    torch.testing.assert_close(la, lb, atol=2e-5, rtol=1e-4)
    for x, y in zip(a.mems + a.mem_keys + a.usage + a.keys + a.values, b.mems + b.mem_keys + b.usage + b.keys + b.values):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
    assert float(a.mems[0].abs().sum()) > 0


def _naive_streaming_logits(model, ids):
    """StreamingLLM written out: keep every token's un-rotated K/V; each query attends to the sinks
    and the last W tokens, rotated by explicit relative distances. No buffer, no masks, no plan.
    A sink s is seen min(a - s, S + W - 1 - s) back (runtime/ring.py)."""
    import torch

    from cortex_edge.model.lm import rope_cos_sin, rotate

    cfg = model.cfg
    S, W, hd, G = cfg.sinks, cfg.window, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    ks = [[] for _ in range(cfg.n_layers)]
    vs = [[] for _ in range(cfg.n_layers)]
    out = []
    for a, tok in enumerate(ids.tolist()):
        x = model.model.embed_tokens(torch.tensor([[tok]]))
        for li, layer in enumerate(model.model.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = att.q_proj(h).view(cfg.n_heads, hd)
            ks[li].append(att.k_proj(h).view(cfg.n_kv_heads, hd))
            vs[li].append(att.v_proj(h).view(cfg.n_kv_heads, hd))
            visible = sorted(set(range(min(S, a + 1))) | set(range(max(S, a - W + 1), a + 1)))
            P = 1000  # any query position: only distances matter
            dist = [min(a - b, S + W - 1 - b) if b < S else a - b for b in visible]
            cq, sq = rope_cos_sin(torch.tensor(P), hd, cfg.rope_theta)
            ck, sk = rope_cos_sin(torch.tensor([P - d for d in dist]), hd, cfg.rope_theta)
            qr = rotate(q, cq, sq)  # (H, hd)
            heads = []
            for hh in range(cfg.n_heads):
                kv = hh // G
                K = torch.stack([ks[li][b][kv] for b in visible])  # (n, hd)
                V = torch.stack([vs[li][b][kv] for b in visible])
                p = torch.softmax(rotate(K, ck, sk) @ qr[hh] / math.sqrt(hd), dim=0)
                heads.append(p @ V)
            x = x + att.o_proj(torch.cat(heads).view(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        out.append(model.lm_head(model.model.norm(x))[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("sinks,window", [(3, 12), (0, 7), (2, 40)])
def test_bounded_attention_matches_obvious_streaming_reference(sinks, window):
    import torch

    from cortex_edge.model.lm import TorchStream, build

    cfg = _cfg(sinks=sinks, window=window, cms=_cfg().cms.__class__(
        slots=(4,), widths=(8,), key_dim=4, event_dim=8, chunk=5, write_every=(1,), decay=(0.1,)))
    model = build(cfg, seed=3)  # W_o = 0: memory silent, this tests attention alone
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = _naive_streaming_logits(model, ids)
        got = TorchStream(model).feed(ids[None])[0]
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-4)


def test_untrained_sidecar_leaves_backbone_exactly_unchanged():
    import torch

    from cortex_edge.model.lm import TorchStream, build

    cfg = _cfg()
    model = build(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        s = TorchStream(model)
        with_mem = s.feed(ids)
        assert float(s.mems[0].abs().sum()) > 0  # memory was written...
        model.cms_read.forward = lambda h, mems, keys, return_stats=False: (h, torch.zeros(*h.shape[:2], cfg.cms.event_dim))
        without = TorchStream(model).feed(ids)
    assert torch.equal(with_mem, without)  # ...and changed nothing: bit-exact


def test_positions_stay_bounded():
    from cortex_edge.runtime import ring

    for lay in (ring.Layout(rows=5, sinks=4, window=64, chunk=16, shift=64), ring.Layout(0, 3, 12, 5, 12),
                ring.Layout(2, 0, 7, 3, 6)):
        C = lay.chunk
        for n_past in list(range(0, 300, 7)) + [10**6, 10**9 + 3]:
            for t in (1, C - n_past % C):
                p = ring.plan_step(n_past, t, lay)
                assert 0 <= p.q_pos.min() and p.q_pos.max() <= lay.max_position
                assert p.total <= lay.capacity


def test_plan_sees_exactly_the_sinks_and_the_window():
    """Every new token sees, through the buffer rows the bias leaves open, exactly the sinks that exist and the
    tokens at most W - 1 back (itself included), each where ring.Layout.index puts it; and the new tokens are
    the last rows in use (where GroupQueryAttention writes them)."""
    from cortex_edge.runtime import ring

    for lay in (ring.Layout(rows=5, sinks=4, window=64, chunk=16, shift=64), ring.Layout(0, 3, 12, 5, 12),
                ring.Layout(2, 0, 7, 3, 6), ring.Layout(1, 2, 16, 4, 5)):
        C = lay.chunk
        for n_past in list(range(0, 5 * lay.window, 3)) + [10**6 + 1]:
            left = C - n_past % C  # decode (the fast plan), two tokens, and the rest of the chunk (the general one)
            for t in sorted({1, min(2, left), left}):
                p = ring.plan_step(n_past, t, lay)
                c0 = n_past - n_past % C
                assert np.array_equal(lay.index(np.arange(n_past, n_past + t), c0),
                                      np.arange(p.total - t, p.total))
                for u in range(t):
                    a = n_past + u
                    want = sorted(set(range(min(lay.sinks, a + 1))) | set(range(max(lay.sinks, a - lay.window + 1), a + 1)))
                    rows = sorted(int(lay.index(b, c0)) for b in want)
                    assert np.flatnonzero(p.bias[0, 0, u] == 0).tolist() == rows, (lay, n_past, t, u)


def test_split_pieces_never_cross_an_event():
    from cortex_edge.runtime import ring

    rng = np.random.default_rng(0)
    for _ in range(200):
        n0, n, c = int(rng.integers(0, 100)), int(rng.integers(1, 100)), int(rng.integers(1, 20))
        pieces = ring.split_pieces(n0, n, c)
        assert sum(pieces) == n
        pos = n0
        for p in pieces:
            assert (pos % c) + p <= c
            pos += p
