"""How should a memory reach a frozen SmolLM2? An upper bound, measured before any training.

Each sample is a chat: a fact stated in the first user turn ("My cat is called Pixel."), filler turns,
then a question about the fact. The fact is placed beyond the attention window: the model sees the
attention sinks, then only the last `--tail` tokens (filler + question). What varies is what the
memory offers the model in place of the lost fact:

  in-window    the fact turn is still in the window (the model's own ability: the reference)
  none         nothing (the sidecar-off control)
  kv@L..       the fact turn's own key/value rows, as computed when it was read, offered to the
               attention of layers L.. as extra rows. start: at consecutive positions just after the
               sinks (where the fact was); recent: seen by every query from the same short distance, as
               if just said (the query is rotated for the memory rows as it is for the sinks)

A whole-turn KV read is what a memory of selected tokens' key/value rows could at best give; a learned
write gate then only has to choose which rows to keep. Greedy answers; a sample counts when the answer
contains the fact's value. Torch, fp32, the GGUF's weights dequantized: an upper bound for the bundle.

    python bench/memory_oracle.py --samples 40 --json bench/results/memory_oracle.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from cortex_edge.export import loaders
from cortex_edge.model.lm import rope_cos_sin, rotate

NAMES = ["Pixel", "Luna", "Biscuit", "Mango", "Oliver", "Ziggy", "Pepper", "Nimbus", "Clover", "Waffles", "Tango",
         "Juniper", "Marble", "Socks", "Rocket", "Hazel"]
CITIES = ["Lisbon", "Nairobi", "Oslo", "Kyoto", "Lima", "Tallinn", "Hanoi", "Porto", "Quito", "Dakar", "Bergen"]
FACTS = [  # (statement, question, value pool)
    ("My name is Orlando and my cat is called {v}.", "What is my cat called?", NAMES),
    ("I grew up in {v}, a city I still miss.", "Which city did I grow up in?", CITIES),
    ("Please remember that my locker code is {v}.", "What is my locker code?", None),
    ("My sister's dog is named {v}.", "What is my sister's dog named?", NAMES),
]


def value(pool, rng) -> str:
    return str(rng.integers(1000, 10000)) if pool is None else pool[int(rng.integers(len(pool)))]


CHAT = [("What is a good hobby for winter?", "Knitting is a cozy hobby for winter: scarves and hats while you stay warm."),
        ("Can you suggest a quick breakfast?", "Oatmeal with banana slices and a spoon of honey is quick and filling."),
        ("How do I keep my plants alive?", "Water them when the top of the soil is dry and give them enough light."),
        ("What is the capital of Australia?", "The capital of Australia is Canberra."),
        ("Tell me a fun fact.", "Octopuses have three hearts and blue blood."),
        ("How far is the Moon?", "The Moon is about 384,400 kilometres from Earth on average."),
        ("Any tips for sleeping better?", "Keep a regular bedtime, a dark room, and no screens in the last hour."),
        ("What should I read next?", "Try a short classic, such as The Old Man and the Sea.")]


def filler_turns(rng, n: int) -> list[dict]:
    out = []
    for j in rng.permutation(len(CHAT))[:n]:
        out += [{"role": "user", "content": CHAT[j][0]}, {"role": "assistant", "content": CHAT[j][1]}]
    return out


class Frozen:
    """The backbone as plain PyTorch over the loaded weights, with a KV cache and optional extra rows."""

    def __init__(self, model):
        self.m, self.cfg = model, model.cfg

    def rope(self, pos):
        return rope_cos_sin(torch.as_tensor(pos), self.cfg.head_dim, self.cfg.rope_theta)

    @torch.no_grad()
    def run(self, ids, pos, past=None, extra=None, extra_pos=None, layers=(), recent=None):
        """ids (T,), pos (T,); past: per layer (K rotated (KV, P, hd), V (KV, P, hd)) fully visible;
        extra: per layer (K unrotated (KV, M, hd), V (KV, M, hd)) rotated at extra_pos, for layers in `layers`;
        recent: every query sees them from position `recent` (else from its own position).
        Returns logits (T, V), new past, and the new tokens' unrotated keys and values per layer."""
        c, m = self.cfg, self.m.model
        T = len(ids)
        H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
        G = H // KV
        x = m.embed_tokens(torch.as_tensor(ids))[None]  # (1, T, D)
        cos, sin = self.rope(pos)
        if extra is not None:
            ecos, esin = self.rope(extra_pos)
            if recent is not None:
                rcos, rsin = self.rope(np.full(T, recent))
        new_past, raw = [], []
        causal = torch.full((T, T), -math.inf).triu(1)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(T, H, hd).transpose(0, 1)  # (H, T, hd)
            k = a.k_proj(h).view(T, KV, hd).transpose(0, 1)  # (KV, T, hd)
            v = a.v_proj(h).view(T, KV, hd).transpose(0, 1)
            raw.append((k, v))
            q0 = q
            q, kr = rotate(q, cos, sin), rotate(k, cos, sin)
            ks, vs, masks = [kr], [v], [causal]
            if past is not None:
                ks.insert(0, past[i][0])
                vs.insert(0, past[i][1])
                masks.insert(0, torch.zeros(T, past[i][0].shape[1]))
            if extra is not None and i in layers:
                ek, ev = extra[i]
                ks.insert(0, rotate(ek, ecos, esin))
                vs.insert(0, ev)
                masks.insert(0, torch.zeros(T, ek.shape[1]))
            K = torch.cat(ks, 1).repeat_interleave(G, 0)  # (H, N, hd)
            V = torch.cat(vs, 1).repeat_interleave(G, 0)
            s = q @ K.transpose(1, 2) / math.sqrt(hd) + torch.cat(masks, 1)
            if extra is not None and i in layers and recent is not None:  # the memory block from its own frame
                M = extra[i][0].shape[1]
                qm = rotate(q0, rcos, rsin)
                s[:, :, :M] = qm @ K[:, :M].transpose(1, 2) / math.sqrt(hd)
            o = (torch.softmax(s, -1) @ V).transpose(0, 1).reshape(1, T, H * hd)
            x = x + a.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            kp = torch.cat([past[i][0], kr], 1) if past is not None else kr
            vp = torch.cat([past[i][1], v], 1) if past is not None else v
            new_past.append((kp, vp))
        logits = self.m.lm_head(m.norm(x))[0]
        return logits, new_past, raw


def greedy(fz: Frozen, prompt_ids, pos0, past, extra, extra_pos, layers, n=12, stop=(), recent=None):
    logits, past, _ = fz.run(prompt_ids, np.arange(pos0, pos0 + len(prompt_ids)), past, extra, extra_pos, layers,
                             recent)
    out, p = [], pos0 + len(prompt_ids)
    for _ in range(n):
        t = int(torch.argmax(logits[-1]))
        if t in stop:
            break
        out.append(t)
        logits, past, _ = fz.run([t], np.array([p]), past, extra, extra_pos, layers, recent)
        p += 1
    return out


def value_rows(tok, ids: list[int], val: str) -> list[int]:
    """Indices of the tokens that spell val in ids, and the two before them."""
    end = next(j for j in range(1, len(ids) + 1) if val in tok.decode(ids[:j]))
    start = max(i for i in range(end) if val in tok.decode(ids[i:end]))
    return list(range(max(0, start - 2), end))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--filler", type=int, default=5, help="turns of other conversation between fact and question")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", action="store_true",
                    help="instead: which layers and which rows the memory must reach (the second table)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, meta = loaders.load_gguf(loaders.smollm2_path())
    model.eval()
    from cortex_edge.runtime.text import ChatFormat

    fmt = ChatFormat(meta["chat_template"], meta.get("bos", ""))
    stop = set(meta["stop_ids"])
    fz = Frozen(model)
    S = model.cfg.sinks
    L = model.cfg.n_layers
    variants = {"in-window": None, "none": None, "kv@0 start": (0, "start"), "kv@0 recent": (0, "recent"),
                "kv@8 recent": (8, "recent"), "kv@15 recent": (15, "recent"), "kv@22 recent": (22, "recent")}
    if args.layers:  # rows: the whole fact turn, or only the value's tokens and the two before them
        variants = {"in-window": None, "kv@12 recent": (12, "recent"), "kv@15 start": (15, "start"),
                    "kv@18 recent": (18, "recent"), "kv@15 recent value-only": (15, "recent", "value")}
    hits = {k: 0 for k in variants}
    rows = []
    t0 = time.time()
    rng = np.random.default_rng(12345)
    for n in range(args.samples):
        stmt, question, pool = FACTS[n % len(FACTS)]
        val = value(pool, rng)
        fact_msgs = [{"role": "user", "content": stmt.format(v=val)},
                     {"role": "assistant", "content": "Got it, I will remember that."}]
        head = fmt.render(fact_msgs[:1], add_generation_prompt=False)
        head_ids = tok.encode(head, add_special_tokens=False).ids  # system + the fact turn
        rest = filler_turns(rng, args.filler) + [{"role": "user", "content": question}]
        full = fmt.render(fact_msgs + rest, add_generation_prompt=True)
        full_ids = tok.encode(full, add_special_tokens=False).ids
        tail_ids = full_ids[len(head_ids):]  # what follows the fact turn: the window when the fact is gone
        # the fact turn as the model read it: its rows, unrotated, per layer
        _, _, raw = fz.run(head_ids, np.arange(len(head_ids)))
        sink_logits, sink_past, _ = fz.run(head_ids[:S], np.arange(S))
        M = len(head_ids) - S
        fact_rows = [(k[:, S:], v[:, S:]) for k, v in raw]
        rec = {"fact": stmt.format(v=val), "value": val}
        for name, spec in variants.items():
            if name == "in-window":
                ids = head_ids[S:] + tail_ids
                out = greedy(fz, ids, S, sink_past, None, None, (), stop=stop)
            elif spec is None:
                out = greedy(fz, tail_ids, S, sink_past, None, None, (), stop=stop)
            else:
                first, how = spec[:2]
                mem, m = fact_rows, M
                if len(spec) > 2:  # only the rows of the value's tokens (and the two before them)
                    sel = value_rows(tok, head_ids[S:], val)
                    mem, m = [(k[:, sel], v[:, sel]) for k, v in fact_rows], len(sel)
                if how == "start":
                    out = greedy(fz, tail_ids, S + M, sink_past, mem, np.arange(S, S + m), range(first, L),
                                 stop=stop)
                else:  # memory rows at 0..m-1, every query at m + 1
                    out = greedy(fz, tail_ids, S, sink_past, mem, np.arange(m), range(first, L), stop=stop,
                                 recent=m + 1)
            ans = tok.decode(out)
            ok = val.lower() in ans.lower()
            hits[name] += ok
            rec[name] = ans
        rows.append(rec)
        print(f"{n + 1}/{args.samples} {time.time() - t0:.0f}s " + " ".join(f"{k}={v}" for k, v in hits.items()),
              flush=True)
    report = {"samples": args.samples, "filler_turns": args.filler,
              "accuracy": {k: v / args.samples for k, v in hits.items()}, "rows": rows,
              "command": "python bench/memory_oracle.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                     if v is not None and k != "json")}
    print(json.dumps(report["accuracy"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
