"""What an 8-bit KV cache would cost in quality, before building one: the cache rounded to int8 in NumPy.
(The built one: `cortex-edge export … --kv-cache int8`, quantize/kv_cache.py; docs/performance.md measures both.)

  python bench/kv8_quality.py BUNDLE [--threads 2] [--pass-keys 16] [--chat-facts 0] [--caches fp32,channel,tensor]
                               [--key-headroom 1] [--keep-rows] [--json bench/results/kv8_quality.json]

onnxruntime's GroupQueryAttention can keep its cache in int8 (k_quant_type / v_quant_type, kv_cache_bit_width 8,
static k_scale / v_scale: bench/gqa_attention.py times it). This measures what that rounding would do to the
default model, without a new graph: before every graph run, every layer's buffer rows in use (rows, sinks and the
recent tokens) are rounded to int8 with static scales and back, which is what the kernel would read from an 8-bit
cache. Scales: per layer and KV head, per channel for values and per rotary pair for keys (a pair's length is the
same at every rotation, so a key that the runtime rotates never leaves its range), or one per layer ("tensor");
calibrated as the largest magnitude over the first 2k tokens of Genesis, so tokens 4k-8k are held out.
Measured against the same bundle with its fp32 cache: Genesis perplexity (0-1k, 4k-8k), top-1 agreement and mean
KL over those 8k tokens, the in-window chat prompts (bench/quality.py's, 32 greedy tokens each, teacher-forced),
pass keys at 2k (`cortex-edge eval niah`'s held-out samples) and, with --chat-facts N, one fact after 2k of
talk (`cortex-edge eval chat-memory`'s first N chats: the rows are read with keys × rows_key_scale, which an
8-bit range calibrated on plain text may clip).
What this leaves out: speed (bench/gqa_attention.py), the kernel's own arithmetic (it dequantizes as scale × q, the
same values), and the current token's own row, which this reads unrounded in its own step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_harm import perplexity  # noqa: E402
from quality import NEW_TOKENS, PROMPTS, TEXT, log_softmax  # noqa: E402


def quantized(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """x as the 8-bit cache would hold it: int8 steps of s."""
    return np.clip(np.rint(x / s), -127, 127).astype(np.int8)


def rounded(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """x as the kernel would read it back from the 8-bit cache."""
    return quantized(x, s) * s


class Int8Cache:
    """Wraps engine.place (called before every graph run) so that the buffers are rounded just before the kernel
    reads them. scales: [(key scale, value scale)] per layer, each broadcastable to (1, KV, rows, hd).
    keep_rows: the row slots (the buffers' first R rows) left unrounded."""

    def __init__(self, engine, scales, keep_rows: bool = False):
        self.engine, self.scales, self.place = engine, scales, engine.place
        self.first = engine.lay.rows if keep_rows else 0
        engine.place = self

    def __call__(self, st, delta, memory=True):
        self.place(st, delta, memory)
        used, r = st.used(self.engine.lay), self.first
        for (sk, sv), k, v in zip(self.scales, st.keys, st.values):
            k[:, :, r:used] = rounded(k[:, :, r:used], sk)
            v[:, :, r:used] = rounded(v[:, :, r:used], sv)

    def remove(self):
        self.engine.place = self.place


def calibrate(engine, ids: list[int], per: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Largest magnitudes in every layer's buffer over ids, fed in 64-token chunks (each chunk's rows read after
    it is written) -> scales: per "channel" (keys per rotary pair) or per "tensor" (one a layer and kind)."""
    st = engine.new_state()
    L = engine.cfg.n_layers
    mk, mv = [0.0] * L, [0.0] * L
    for j in range(0, len(ids), 64):
        engine.feed(st, ids[j:j + 64])
        used = st.used(engine.lay)
        for i, (k, v) in enumerate(zip(st.keys, st.values)):
            k, v = k[:, :, :used], v[:, :, :used]
            h = k.shape[-1] // 2
            pair = np.sqrt(k[..., :h] ** 2 + k[..., h:] ** 2)  # (1, KV, rows, hd/2): a key's rotation-invariant part
            mk[i] = np.maximum(mk[i], pair.max(axis=2, keepdims=True))
            mv[i] = np.maximum(mv[i], np.abs(v).max(axis=2, keepdims=True))
    out = []
    for a, b in zip(mk, mv):
        if per == "tensor":
            a, b = a.max(), b.max()
        else:
            a = np.concatenate([a, a], axis=-1)  # the pair's scale on both of its channels
        out.append((np.float32(np.maximum(a, 1e-6) / 127), np.float32(np.maximum(b, 1e-6) / 127)))
    return out


def prompts_logits(engine, chat, seqs=None):
    """The in-window chat prompts teacher-forced -> ([logits over each reply], [each reply's tokens]); the replies
    are made greedily when seqs is None, else seqs' are fed (the same tokens for every cache)."""
    out, made = [], []
    for n, p in enumerate(PROMPTS):
        ids = chat.encode_segments(chat.fmt.segments([{"role": "user", "content": p}], add_generation_prompt=True))
        if seqs is None:
            st = engine.new_state()
            logits, seq = engine.feed(st, ids), []
            for _ in range(NEW_TOKENS):
                seq.append(int(np.argmax(logits)))
                logits = engine.feed(st, [seq[-1]])
        else:
            seq = seqs[n]
        made.append(seq)
        out.append(engine.feed(engine.new_state(), np.array(ids + seq), all_logits=True)[len(ids) - 1:-1])
    return out, made


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    lp, lq = log_softmax(a), log_softmax(b)
    return {"top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
            "mean_kl": float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pass-keys", type=int, default=16, help="pass-key samples at 2k per variant (0: none)")
    ap.add_argument("--chat-facts", type=int, default=0, help="chats with one fact after 2k of talk per variant")
    ap.add_argument("--caches", default="fp32,channel,tensor", help="which caches: fp32, channel, tensor")
    ap.add_argument("--key-headroom", type=float, default=1.0, help="the keys' calibrated scales times this")
    ap.add_argument("--keep-rows", action="store_true", help="leave the row slots unrounded")
    ap.add_argument("--json", default="bench/results/kv8_quality.json")
    a = ap.parse_args()
    from cortex_edge.runtime import chat_memory, niah
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.chat import Chat
    from cortex_edge.runtime.engine import Engine

    eng = Engine(load_bundle(a.bundle), threads=a.threads)
    chat = Chat(eng)
    ids = chat.plain.encode(TEXT.read_text(), add_special_tokens=False).ids
    t0 = time.time()
    names = {"fp32": "fp32", "channel": "int8 per channel", "tensor": "int8 per tensor"}
    want = [c.strip() for c in a.caches.split(",") if c.strip()]
    if not want or set(want) - set(names):
        ap.error(f"--caches: a comma-separated list of {', '.join(names)}")
    variants = {names[c]: None if c == "fp32" else [(k * np.float32(a.key_headroom), v)
                                                      for k, v in calibrate(eng, ids[:2048], c)] for c in want}
    rows, ref, ref_prompts, seqs = [], None, None, None
    for name, scales in variants.items():
        hook = Int8Cache(eng, scales, a.keep_rows) if scales is not None else None
        lg = eng.feed(eng.new_state(), np.array(ids[:8192]), all_logits=True)
        pl, made = prompts_logits(eng, chat, seqs)
        row = {"cache": name, "genesis_perplexity": perplexity(lg, ids[:8192])}
        if ref is None:
            ref, ref_prompts, seqs = lg, pl, made
        else:
            row["genesis_vs_fp32"] = compare(ref, lg)
            row["prompts_vs_fp32"] = compare(np.concatenate(ref_prompts), np.concatenate(pl))
        if a.pass_keys:
            r = niah.run(eng, [2048], a.pass_keys, memory_modes=(True,))["rows"][0]
            row["pass_keys_2k"] = {"correct": int(round(r["accuracy"] * r["samples"])), "samples": r["samples"]}
        if a.chat_facts:
            r = chat_memory.run(eng, [2048], a.chat_facts, control=False, reference=False)["rows"][0]
            row["chat_facts_2k"] = {"correct": int(round(r["accuracy"] * r["facts"])), "facts": r["facts"]}
        if hook:
            hook.remove()
        rows.append(row)
        print(json.dumps(row), flush=True)
    c = eng.cfg
    fp32_bytes = 2 * c.n_layers * c.n_kv_heads * eng.lay.capacity * c.head_dim * 4
    rep = {"bundle": a.bundle, "threads": a.threads, "calibration": "Genesis tokens 0-2k",
           "key_headroom": a.key_headroom, "rows_left_unrounded": a.keep_rows, "rows": rows,
           "buffer_bytes_full": {"fp32": fp32_bytes, "int8": fp32_bytes // 4},
           "seconds": round(time.time() - t0, 1),
           "command": f"python bench/kv8_quality.py BUNDLE --threads {a.threads} --pass-keys {a.pass_keys} "
                      f"--chat-facts {a.chat_facts} --caches {a.caches} --key-headroom {a.key_headroom}"
                      + (" --keep-rows" if a.keep_rows else "")}
    with open(a.json, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
