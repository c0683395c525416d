"""`cortex-edge train --backbone SOURCE`: train the row memory's write gate on a frozen backbone.

The row memory (cms.RowWriter, runtime/rows.py) keeps the key/value rows of chosen tokens for the upper
layers' attention; which tokens is the write gate's choice, g = sigmoid(w_g . tanh(W_z f + b_z) + b_g) on the
token's compressed hidden state f = W_c RMSNorm(h), h after block memory_layer. The backbone is frozen and
never changes; only the gate learns (W_c, the norm's weight, W_z, w_g), with a binary cross-entropy per token:
1 on the tokens of a fact statement, 0 elsewhere (system prompt, questions, other talk, the assistant's
answers, long passages of real text).

Cost: the gate reads only hidden states of blocks 0..memory_layer, which the memory never changes, so they
are computed once per training sequence and cached on disk (features/NNNN.npz, fp16), then the gate trains on
the cache in seconds. A run killed half way resumes from the cached sequences.

Data (runtime/memory_tasks.py, seeds below HELD_OUT_SEED; the held-out wordings and talk never appear):
  chat   conversations rendered with the backbone's own chat template: other talk, 1-4 facts (one or two
         per message), more talk
  text   raw text (Genesis verses, small talk, trivia), or a third of the time a few short sentences repeated
         (the pass-key task's kind of haystack, mt.filler_unit: not the evaluation's own filler), with 1-3 fact
         statements inserted at random places
What this leaves out: the read (no training: the frozen model copies from its own rows, docs/memory.md), the
export (export/pipeline.py reads the trained weights).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cortex_edge.runtime import memory_tasks as mt

GATE_NAMES = ("cms_read.norm_in.weight", "cms_read.compress.weight", "rows.z.weight", "rows.z.bias",
              "rows.gate.weight", "rows.gate.bias")


@torch.no_grad()
def lower_hidden(model, ids: list[int], upto: int) -> torch.Tensor:
    """h after block `upto` for every token, plain causal attention (sequences shorter than the window,
    where the runtime's sinks + ring is the same attention). (T, D) fp32."""
    from cortex_edge.model.lm import rope_cos_sin, rotate

    c = model.cfg
    H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
    T = len(ids)
    x = model.model.embed_tokens(torch.tensor(ids))[None]
    cos, sin = rope_cos_sin(torch.arange(T), hd, c.rope_theta, c.rope_freq_divisors)
    for layer in model.model.layers[:upto + 1]:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = rotate(a.q_proj(h).view(1, T, H, hd).transpose(1, 2), cos, sin)
        k = rotate(a.k_proj(h).view(1, T, KV, hd).transpose(1, 2), cos, sin)
        v = a.v_proj(h).view(1, T, KV, hd).transpose(1, 2)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, T, H * hd)
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x[0]


def _label(offsets, spans, n: int) -> np.ndarray:
    y = np.zeros(n, np.float32)
    for i, (a, b) in enumerate(offsets):
        if any(a < e and b > s for s, e in spans):
            y[i] = 1.0
    return y


def chat_sample(seed: int, tok, fmt, count) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    pre = []
    for _ in range(int(rng.integers(0, 4))):
        u, a = mt.talk_turn(rng, ["smalltalk", "trivia", "scripture"][int(rng.integers(3))])
        pre += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    conv = mt.conversation(seed, int(rng.integers(1, 5)), int(rng.integers(60, 400)), count)
    msgs = pre + conv.messages
    if rng.random() < 0.5:  # a question at the end (never to be stored)
        msgs.append({"role": "user", "content": conv.facts[0].question})
    text = fmt.render(msgs, add_generation_prompt=False)
    enc = tok.encode(text, add_special_tokens=False)
    spans, at = [], 0
    for f in conv.facts:
        s = text.find(f.statement[1:], at) - 1 if f.statement not in text[at:] else text.find(f.statement, at)
        if s >= 0:
            spans.append((s, s + len(f.statement)))
    return enc.ids, _label(enc.offsets, spans, len(enc.ids))


def text_sample(seed: int, tok) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    pieces = []
    if rng.random() < FILLER_SHARE:  # a repetitive haystack: one short unit of sentences, repeated
        unit = mt.filler_unit(rng)
        pieces = [unit] * int(rng.integers(10, 40))
    else:
        for _ in range(int(rng.integers(8, 30))):
            kind = ["smalltalk", "trivia", "scripture", "scripture"][int(rng.integers(4))]
            u, a = mt.talk_turn(rng, kind)
            pieces.append(a if kind != "scripture" else u.split(": ", 1)[1].rsplit(" What", 1)[0])
    facts = [mt.draw_fact(rng, mt.KINDS[int(i)], False) for i in rng.permutation(len(mt.KINDS))[:int(rng.integers(1, 4))]]
    for f in facts:
        pieces.insert(int(rng.integers(len(pieces) + 1)), f.statement)
    text = " ".join(pieces)
    enc = tok.encode(text, add_special_tokens=False)
    spans = []
    for f in facts:
        s = text.find(f.statement)
        spans.append((s, s + len(f.statement)))
    return enc.ids, _label(enc.offsets, spans, len(enc.ids))


def cache_features(model, tok, fmt, folder: Path, n_chat: int, n_text: int, seed0: int = 0, progress=None,
                   max_tokens: int = 1000) -> None:
    """Hidden states after block memory_layer of every training sequence, one .npz each (resumable)."""
    folder.mkdir(parents=True, exist_ok=True)

    def count(s):
        return len(tok.encode(s, add_special_tokens=False).ids)

    for i in range(n_chat + n_text):
        p = folder / f"{i:05d}.npz"
        seed = seed0 + i
        ids, y = chat_sample(seed, tok, fmt, count) if i < n_chat else text_sample(seed, tok)
        ids, y = ids[:max_tokens], y[:max_tokens]
        if p.exists():  # a cached sequence is reused only if it is this sequence (the data may have changed)
            with np.load(p, allow_pickle=False) as z:
                if np.array_equal(z["ids"], np.array(ids, np.int32)) and np.array_equal(z["y"], y):
                    continue
        h = lower_hidden(model, ids, model.cfg.memory_layer)
        tmp = p.with_suffix(".tmp.npz")
        np.savez(tmp, h=h.numpy().astype(np.float16), y=y, ids=np.array(ids, np.int32))
        tmp.replace(p)
        if progress:
            progress(i + 1, n_chat + n_text, len(ids))


def load_cache(folder: Path, skip_first: int = 4, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """All cached tokens but each sequence's first skip_first (the attention sinks: never stored), and the
    sequences' lengths. n: the first n sequences (a cache may hold more than a run asks for)."""
    hs, ys = [], []
    for p in sorted(folder.glob("[0-9]*.npz"))[:n]:
        with np.load(p, allow_pickle=False) as z:
            hs.append(z["h"][skip_first:])
            ys.append(z["y"][skip_first:])
    return (torch.from_numpy(np.concatenate(hs).astype(np.float32)), torch.from_numpy(np.concatenate(ys)),
            [len(y) for y in ys])


class Gate(torch.nn.Module):
    """The write gate as trained (the same maths as cms.RowWriter.gate_logit after the graph's W_c RMSNorm)."""

    def __init__(self, dim: int, event_dim: int, eps: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.eps = eps
        self.norm = torch.nn.Parameter(torch.ones(dim))
        self.compress = torch.nn.Parameter(torch.randn(event_dim, dim, generator=g) / math.sqrt(dim))
        self.z_w = torch.nn.Parameter(torch.randn(event_dim, event_dim, generator=g) / math.sqrt(event_dim))
        self.z_b = torch.nn.Parameter(torch.zeros(event_dim))
        self.g_w = torch.nn.Parameter(torch.zeros(1, event_dim))
        self.g_b = torch.nn.Parameter(torch.full((1,), -4.0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n = self.norm * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        f = n @ self.compress.t()
        z = torch.tanh(f @ self.z_w.t() + self.z_b)
        return (z @ self.g_w.t() + self.g_b)[..., 0]  # logit

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(GATE_NAMES, (self.norm, self.compress, self.z_w, self.z_b, self.g_w, self.g_b)))


def train_gate(h: torch.Tensor, y: torch.Tensor, dim: int, event_dim: int, eps: float, steps: int = 3000,
               batch: int = 4096, lr: float = 2e-3, pos_weight: float = 4.0, seed: int = 0, log=None) -> Gate:
    torch.manual_seed(seed)
    gate = Gate(dim, event_dim, eps, seed)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    pw = torch.tensor(pos_weight)
    for step in range(steps):
        idx = torch.randint(0, h.shape[0], (batch,), generator=gen)
        logit = gate(h[idx])
        loss = F.binary_cross_entropy_with_logits(logit, y[idx], pos_weight=pw)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gate.parameters(), 1.0)
        for gr in opt.param_groups:
            gr["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        if log and (step % 200 == 0 or step == steps - 1):
            log({"step": step, "loss": float(loss.detach())})
    return gate


@torch.no_grad()
def gate_report(gate: Gate, h: torch.Tensor, y: torch.Tensor, thresholds=(0.3, 0.5, 0.7, 0.9)) -> dict:
    g = torch.sigmoid(gate(h))
    out = {}
    for t in thresholds:
        w = g > t
        tp = int((w & (y > 0)).sum())
        out[str(t)] = {"recall": tp / max(1, int((y > 0).sum())), "precision": tp / max(1, int(w.sum())),
                       "false_positive_rate": int((w & (y == 0)).sum()) / max(1, int((y == 0).sum()))}
    return out


def lookahead_report(g: np.ndarray, y: np.ndarray, lengths: list[int], tau: float,
                     lookaheads=(0, 1, 2, 3, 4, 5, 6, 8)) -> dict:
    """Per lookahead L: the share of fact-statement tokens kept (the strongest gate g among the token and the
    next L of its sequence > tau) and of other tokens kept. g, y: the sequences' tokens one after another."""
    yy = y > 0
    out = {}
    for L in lookaheads:
        s, at = np.empty_like(g), 0
        for n in lengths:
            seq = np.concatenate([g[at:at + n], np.zeros(L, g.dtype)])
            s[at:at + n] = np.max(np.lib.stride_tricks.sliding_window_view(seq, L + 1), axis=1)
            at += n
        kept = s > tau
        out[str(L)] = {"recall": float(kept[yy].mean()), "false_positive_rate": float(kept[~yy].mean())}
    return out


def choose_lookahead(rep: dict) -> int:
    """The smallest lookahead whose validation recall of statement tokens reaches TARGET_RECALL (else the best)."""
    ok = [int(L) for L, r in rep.items() if r["recall"] >= TARGET_RECALL]
    return min(ok) if ok else int(max(rep, key=lambda L: rep[L]["recall"]))


N_CHAT, N_TEXT = 500, 450  # training sequences (about 600k tokens)
FILLER_SHARE = 1 / 3  # of the texts: repetitive filler as haystack (mt.filler_unit), the rest real text
N_VAL_CHAT, N_VAL_TEXT = 40, 30  # validation sequences (seeds of their own), for the threshold
TARGET_PRECISION = 0.99  # the gate's own floor: the lowest threshold whose validation precision reaches this
# How the rows are written and read, chosen end to end on validation seeds (bench/row_placement.py --thresholds
# --key-scales; docs/memory.md): a token is kept only when its gate > 0.97 (fewer, surer rows) and the rows' keys
# are read 1.5 times louder. Pass keys, chat facts and Genesis perplexity decided it; the gate's training does not
# depend on either.
READ_THRESHOLD = 0.97
ROWS_KEY_SCALE = 1.5
TARGET_RECALL = 0.99  # the lookahead: the smallest whose validation recall of statement tokens reaches this


def choose_threshold(gate: Gate, h: torch.Tensor, y: torch.Tensor) -> tuple[float, dict]:
    """-> (the gate's precision floor: the lowest threshold whose validation precision reaches TARGET_PRECISION,
    the report, READ_THRESHOLD's included)."""
    ts = sorted({round(0.05 * i, 2) for i in range(2, 20)} | {READ_THRESHOLD})
    rep = gate_report(gate, h, y, ts)
    ok = [t for t in ts if rep[str(t)]["precision"] >= TARGET_PRECISION]
    return (ok[0] if ok else ts[-1]), rep


def train_sidecar(source: str, out: Path, cache: Path, rows: int = 48, steps: int = 3000, seed: int = 0,
                  threads: int | None = None, log=print) -> dict:
    """The whole recipe: features (cached, resumable), the gate, the threshold, the sidecar file."""
    from cortex_edge.export.pipeline import load_source
    from cortex_edge.runtime.text import ChatFormat

    if threads:
        torch.set_num_threads(threads)

    t0 = time.time()
    model, tok, meta = load_source(source)
    model.eval()
    fmt = ChatFormat(meta.get("chat_template", ""), meta.get("bos", "") or "")
    ntok = [0]

    def prog(i, n, t):
        ntok[0] += t
        if i % 50 == 0 or i == n:
            log(f"features {i}/{n}: {ntok[0]} new tokens, {ntok[0] / max(1e-9, time.time() - t0):.0f} tok/s")

    cache_features(model, tok, fmt, cache, N_CHAT, N_TEXT, seed0=seed * 100_000, progress=prog)
    cache_features(model, tok, fmt, cache / "val", N_VAL_CHAT, N_VAL_TEXT, seed0=mt.HELD_OUT_SEED - 10_000,
                   progress=prog)
    h, y, _ = load_cache(cache, n=N_CHAT + N_TEXT)
    log(f"training the gate on {h.shape[0]} tokens ({int(y.sum())} in fact statements)")
    c = model.cfg
    gate = train_gate(h, y, c.dim, 128, c.norm_eps, steps=steps, seed=seed,
                      log=lambda r: log(f"step {r['step']}: loss {r['loss']:.4f}"))
    hv, yv, lv = load_cache(cache / "val", n=N_VAL_CHAT + N_VAL_TEXT)
    floor, rep = choose_threshold(gate, hv, yv)
    with torch.no_grad():  # the lookahead is the gate's: chosen at its precision floor
        look = lookahead_report(torch.sigmoid(gate(hv)).numpy(), yv.numpy(), lv, floor)
    L = choose_lookahead(look)
    tau = max(floor, READ_THRESHOLD)
    cms = row_cms_config(c.n_layers, c.cms.chunk, tau, rows=rows, lookahead=L)
    info = {"source": source, "training_tokens": int(h.shape[0]), "positive_tokens": int(y.sum()), "steps": steps,
            "seed": seed, "threshold": tau, "validation": rep[str(tau)], "precision_floor": floor,
            "validation_floor": rep[str(floor)], "lookahead": L, "validation_lookahead": look,
            "seconds": round(time.time() - t0, 1)}
    save_sidecar(out, gate, cms, c.memory_layer, info)
    log(f"precision floor {floor}: validation precision {rep[str(floor)]['precision']:.3f}, "
        f"recall {rep[str(floor)]['recall']:.3f}")
    log(f"threshold {tau}: validation precision {rep[str(tau)]['precision']:.3f}, recall {rep[str(tau)]['recall']:.3f}, "
        f"false positives {rep[str(tau)]['false_positive_rate']:.2e} of other tokens")
    log(f"lookahead {L}: statement tokens kept {look[str(L)]['recall']:.3f}, other tokens "
        f"{look[str(L)]['false_positive_rate']:.2e} (lookahead 0: {look['0']['recall']:.3f}, "
        f"{look['0']['false_positive_rate']:.2e})")
    return info


# ---- the trained sidecar on disk, and on a backbone
SIDECAR_FORMAT = "cortex-edge-sidecar"


def row_cms_config(n_layers: int, chunk: int, threshold: float, rows: int = 48, rows_from: int | None = None,
                   lookahead: int = 0, place: str = "recency", gap: int = 16, key_scale: float = ROWS_KEY_SCALE):
    """The CMS of a backbone with a row level: the row level does the remembering; the residual levels are kept
    at one small level (its read gate closed, W_o = 0) so that the whole state fits one A76 core's L2. The rows
    are read by recency, 16 distances back, their keys 1.5 times louder (config.rows_place, rows_gap,
    rows_key_scale: chosen on validation seeds, docs/memory.md); the gate's training does not depend on them."""
    from cortex_edge.config import CMSConfig

    return CMSConfig(slots=(16,), widths=(64,), key_dim=32, event_dim=128, chunk=chunk, write_every=(1,),
                     decay=(0.05,), rows=rows, rows_from=(4 * n_layers) // 15 if rows_from is None else rows_from,
                     rows_threshold=threshold, rows_decay=1e-3, rows_lookahead=lookahead, rows_place=place,
                     rows_gap=gap, rows_key_scale=key_scale)


def save_sidecar(path: Path, gate: Gate, cms, memory_layer: int, info: dict) -> None:
    import dataclasses

    from safetensors.torch import save_file

    meta = {"format": SIDECAR_FORMAT, "cms": json.dumps(dataclasses.asdict(cms)), "memory_layer": str(memory_layer),
            "info": json.dumps(info)}
    save_file({k: v.detach().float().contiguous() for k, v in gate.named().items()}, str(path), metadata=meta)


def load_sidecar(path: Path):
    """-> (CMSConfig, memory_layer, tensors, info). Refuses anything that is not a sidecar file, by name."""
    from safetensors import safe_open

    from cortex_edge.config import CMSConfig
    from cortex_edge.runtime.errors import CortexError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own errors for damaged files
        raise CortexError(f"cannot read sidecar {path}: {e}") from None
    if meta.get("format") != SIDECAR_FORMAT or set(tensors) != set(GATE_NAMES):
        raise CortexError(f"{path} is not a cortex-edge sidecar (format {meta.get('format')!r})")
    cms = CMSConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["cms"]).items()})
    cms.validate()
    return cms, int(meta["memory_layer"]), tensors, json.loads(meta.get("info", "{}"))


@torch.no_grad()
def attach(model, cms, memory_layer: int, tensors: dict):
    """The backbone with this CMS: fresh residual levels (read gate closed: they change nothing) and the trained
    row gate. The backbone's weights are untouched."""
    import dataclasses

    from cortex_edge.model.cms import CMSReader, CMSWriter
    from cortex_edge.runtime.errors import CortexError

    cfg = dataclasses.replace(model.cfg, cms=cms, memory_layer=memory_layer)
    cfg.validate()
    if tuple(tensors["cms_read.compress.weight"].shape) != (cms.event_dim, cfg.dim):
        raise CortexError(f"the sidecar was trained for a model of width {tensors['cms_read.compress.weight'].shape[1]},"
                          f" this one has {cfg.dim}")
    torch.manual_seed(0)  # the unused residual levels' weights: deterministic
    model.cfg = cfg
    model.cms_read = CMSReader(cfg.dim, cms, cfg.norm_eps)
    model.cms_write = CMSWriter(cms)
    model.cms_read.norm_in.weight.copy_(tensors["cms_read.norm_in.weight"])
    model.cms_read.compress.weight.copy_(tensors["cms_read.compress.weight"])
    r = model.cms_write.rows
    r.z.weight.copy_(tensors["rows.z.weight"])
    r.z.bias.copy_(tensors["rows.z.bias"])
    r.gate.weight.copy_(tensors["rows.gate.weight"])
    r.gate.bias.copy_(tensors["rows.gate.bias"])
    return model.eval()
