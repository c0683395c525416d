"""Does the memory harm what the model does without it? Sidecar on against sidecar off, one bundle, the runtime.

  python bench/memory_harm.py BUNDLE --json bench/results/memory_harm.json
  python bench/memory_harm.py BUNDLE --rows-bias 3 --json bench/results/memory_harm_row_bias_3.json

--rows-bias replaces the config's rows_bias (a constant added to every visible row's attention logit) in-process.

  in-window   bench/quality.py's ten chat prompts, each continued greedily by 32 tokens with the sidecar off,
              then teacher-forced with it on: top-1 agreement and mean KL(off || on) over the continuation
  genesis     perplexity of cortex_edge/model/data/genesis_kjv.txt (public domain) at tokens 0-1k and
              4k-8k (far beyond the 1,024-token window), on and off, and the rows the memory kept
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import NEW_TOKENS, PROMPTS, TEXT, log_softmax  # noqa: E402


def genesis(eng, memory: bool = True):
    """Perplexity of cortex_edge/model/data/genesis_kjv.txt at tokens 0-1k and 4k-8k, and the state after it."""
    from cortex_edge.runtime.chat import Chat

    ids = Chat(eng).plain.encode(TEXT.read_text(), add_special_tokens=False).ids[:8192]
    st = eng.new_state()
    lg = eng.feed(st, np.array(ids), all_logits=True, memory=memory)
    return perplexity(lg, ids), st


def perplexity(lg: np.ndarray, ids: list[int]) -> dict:
    """lg (8192, V): the logits of Genesis' first 8,192 tokens ids -> perplexity at tokens 0-1k and 4k-8k."""
    nll = -log_softmax(lg[:-1])[np.arange(len(ids) - 1), ids[1:]]
    return {"0-1k": float(np.exp(nll[:1023].mean())), "4k-8k": float(np.exp(nll[4095:8191].mean()))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows-bias", type=float, default=None, help="replace the bundle's rows_bias")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.chat import Chat
    from cortex_edge.runtime.engine import Engine

    eng = Engine(load_bundle(args.bundle), threads=args.threads)
    if args.rows_bias is not None:
        eng.cfg = dataclasses.replace(eng.cfg, cms=dataclasses.replace(eng.cfg.cms, rows_bias=args.rows_bias))
    chat = Chat(eng)
    t0 = time.time()
    agree, kls = [], []
    for p in PROMPTS:
        ids = chat.encode_segments(chat.fmt.segments([{"role": "user", "content": p}], add_generation_prompt=True))
        st = eng.new_state()
        logits = eng.feed(st, ids, memory=False)
        seq = []
        for _ in range(NEW_TOKENS):
            seq.append(int(np.argmax(logits)))
            logits = eng.feed(st, [seq[-1]], memory=False)
        full = np.array(ids + seq)
        off = eng.feed(eng.new_state(), full, all_logits=True, memory=False)[len(ids) - 1:-1]
        on = eng.feed(eng.new_state(), full, all_logits=True, memory=True)[len(ids) - 1:-1]
        lp, lq = log_softmax(off), log_softmax(on)
        agree.append(float(np.mean(off.argmax(-1) == on.argmax(-1))))
        kls.append(float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1))))
    ppl = {}
    ppl["off"], _ = genesis(eng, memory=False)
    ppl["on"], st = genesis(eng, memory=True)
    rows = None if st.rows is None else int(np.sum(st.rows.token >= 0))
    rep = {"bundle": args.bundle, "in_window": {"prompts": len(PROMPTS), "tokens_each": NEW_TOKENS,
                                                  "top1_agreement": float(np.mean(agree)), "mean_kl": float(np.mean(kls))},
           "genesis_perplexity": ppl, "genesis_rows_kept": rows,
           "genesis_ppl_change_4k_8k": ppl["on"]["4k-8k"] / ppl["off"]["4k-8k"] - 1,
           "seconds": round(time.time() - t0, 1), "rows_bias": eng.cfg.cms.rows_bias,
           "command": "python bench/memory_harm.py " + args.bundle
           + ("" if args.rows_bias is None else f" --rows-bias {args.rows_bias:g}")}
    print(json.dumps({k: v for k, v in rep.items()}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
