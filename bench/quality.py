"""Quality of exported bundles against transformers fp32 on the same weights (the default model).

  python bench/quality.py BUNDLE [BUNDLE ...] [--json FILE]

For each bundle (e.g. fp32, int8, int4 exports of smollm2):
  agreement   transformers' LlamaForCausalLM fp32 greedily continues each fixed chat prompt by 32 tokens;
              the bundle, through the NumPy/onnxruntime runtime, is teacher-forced on the same
              sequence: top-1 agreement and mean KL(p_fp32 || p_bundle) over the continuation positions.
  perplexity  on cortex_edge/model/data/genesis_kjv.txt (public domain): tokens 0-1k, and tokens 4k-8k (far beyond
              the 1024-token window: fluency with the bounded attention state), through the runtime.
The reference perplexity with unbounded attention (transformers, full context) is printed beside.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a ten-year-old in two sentences.",
    "Give me three tips for learning to play chess.",
    "What is 17 times 23? Show your steps.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Suggest a name for a small coffee shop by the river.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
]
NEW_TOKENS = 32
TEXT = Path(__file__).parent.parent / "cortex_edge" / "model" / "data" / "genesis_kjv.txt"


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(prompts_ids):
    import torch
    from transformers import AutoModelForCausalLM

    from cortex_edge.export.loaders import smollm2_path

    p = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts_ids:
            seq = list(ids)
            for _ in range(NEW_TOKENS):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
            logits = hf(torch.tensor([seq])).logits[0].numpy()
            out.append((seq, logits))
    return hf, out


def nll_through_runtime(engine, ids, ranges):
    """Feed ids chunk by chunk; return mean NLL over each [lo, hi) range of predicted positions."""
    st = engine.new_state()
    C = engine.cfg.cms.chunk
    sums = {r: [0.0, 0] for r in ranges}
    for j in range(0, len(ids) - 1, C):
        piece = ids[j:min(j + C, len(ids) - 1)]
        lp = log_softmax(engine.feed(st, piece, all_logits=True))
        for k in range(len(piece)):
            pos = j + k + 1  # the position this row predicts
            for lo, hi in ranges:
                if lo <= pos < hi:
                    sums[(lo, hi)][0] -= float(lp[k, ids[pos]])
                    sums[(lo, hi)][1] += 1
    return {r: s / max(n, 1) for r, (s, n) in sums.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine
    from cortex_edge.runtime.text import ChatFormat, load_tokenizer

    first = load_bundle(a.bundles[0])
    tok = load_tokenizer(first.file("tokenizer.json"))
    fmt = ChatFormat(first.manifest["tokenizer"]["chat_template"])
    prompts_ids = [tok.encode("".join(t for t, _ in fmt.first_turn(p)), add_special_tokens=False).ids for p in PROMPTS]
    t0 = time.time()
    hf, ref = reference(prompts_ids)
    text_ids = tok.encode(TEXT.read_text(), add_special_tokens=False).ids
    ranges = [(1, 1024), (4096, 8192)]
    with torch.no_grad():  # full-context reference perplexity (no window)
        full = {}
        for lo, hi in ranges:
            ctx = text_ids[:hi]
            lp = torch.log_softmax(hf(torch.tensor([ctx])).logits[0], -1).numpy()
            full[(lo, hi)] = float(-np.mean([lp[p - 1, ctx[p]] for p in range(lo, hi)]))
    print(f"reference (transformers fp32) ready in {time.time() - t0:.0f} s; text {len(text_ids)} tokens")
    report = {"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "text_tokens": len(text_ids),
              "reference_ppl_full_context": {f"{lo}-{hi}": float(np.exp(v)) for (lo, hi), v in full.items()},
              "bundles": []}
    for path in a.bundles:
        b = load_bundle(path)
        eng = Engine(b, threads=a.threads)
        agree, kls = [], []
        for (seq, logits), ids in zip(ref, prompts_ids):
            got = eng.feed(eng.new_state(), seq, all_logits=True)
            lo = len(ids) - 1  # the row predicting the first generated token
            rows = slice(lo, len(seq) - 1)
            lp, lq = log_softmax(logits[rows]), log_softmax(got[rows])
            agree += list(lp.argmax(-1) == lq.argmax(-1))
            kls += list(np.sum(np.exp(lp) * (lp - lq), axis=-1))
        nll = nll_through_runtime(eng, text_ids[:8192], ranges)
        r = {"bundle": str(path), "weights": b.weights, "state": b.state_format,
             "graph_mb": b.manifest["files"]["model.onnx"]["bytes"] / 1e6,
             "top1_agreement": float(np.mean(agree)), "mean_kl": float(np.mean(kls)), "positions": len(agree),
             "ppl_0_1k": float(np.exp(nll[ranges[0]])), "ppl_4k_8k": float(np.exp(nll[ranges[1]]))}
        report["bundles"].append(r)
        print(f"{b.weights:>5} weights, {b.state_format} state, {r['graph_mb']:.0f} MB: top-1 {r['top1_agreement']:.3f} "
              f"KL {r['mean_kl']:.4f} over {r['positions']} positions; ppl 0-1k {r['ppl_0_1k']:.2f}, "
              f"4k-8k {r['ppl_4k_8k']:.2f}")
    print("reference full-context ppl: " + ", ".join(f"{k}: {v:.2f}" for k, v in report["reference_ppl_full_context"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
