"""Both of the graph's branches against the torch reference, on a chat whose fact is read back from the rows.

  python bench/decode_paths.py BUNDLE [--threads 2] [--json bench/results/decode_paths_smollm2.json]

A fixed 1,467-token conversation rendered with the model's chat template: "My sister's name is Ingrid.", four
turns pasting Genesis passages with fixed assistant replies, then "What is my sister's name?" (the fact's rows
leave the 1,024-token window and are read beyond it). Its logits over the last 700 tokens, from the bundle fed by
chunks (the chunk branch: the exact attention) and token by token (the decode branch: GroupQueryAttention, the
sinks and rows rotated to each token's frame), against TorchStream in fp32 (cortex_edge/model/lm.py, the exact
attention throughout, the same sidecar): mean KL, top-1 agreement, and the rows each holds.
What this leaves out: sampling (the logits are teacher-forced); it needs torch (the reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cortex_edge.export import pipeline
from cortex_edge.model import rows_train
from cortex_edge.model.lm import TorchStream
from cortex_edge.runtime import memory_tasks as mt
from cortex_edge.runtime.bundle import load_bundle
from cortex_edge.runtime.chat import Chat
from cortex_edge.runtime.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import log_softmax  # noqa: E402

LAST = 700


def conversation(chat: Chat) -> np.ndarray:
    verses = mt.genesis_verses()
    msgs = [{"role": "user", "content": "My sister's name is Ingrid."},
            {"role": "assistant", "content": "That's a lovely name."}]
    for i in range(4):
        msgs += [{"role": "user", "content": "Here is a passage I am reading: " + " ".join(verses[40 * i:40 * i + 12])
                  + " What do you think of it?"},
                 {"role": "assistant", "content": "It is a beautiful passage about creation and the early world."}]
    msgs.append({"role": "user", "content": "What is my sister's name?"})
    return np.array(chat.encode_segments(chat.fmt.segments(msgs, True)), np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    engine = Engine(load_bundle(a.bundle), threads=a.threads)
    ids = conversation(Chat(engine))
    lm, _, _ = pipeline.load_source("smollm2")
    cms, layer, tensors, _ = rows_train.load_sidecar(pipeline.SMOLLM2_SIDECAR)
    lm = rows_train.attach(lm, cms, layer, tensors).eval()
    with torch.no_grad():
        ts = TorchStream(lm)
        ref = ts.feed(torch.from_numpy(ids)[None])[0].numpy()[-LAST:]
    lp = log_softmax(ref)
    out = {"bundle": a.bundle, "tokens": int(ids.size), "compared": LAST,
           "reference_rows_held": int((ts.row_token[0] >= 0).sum()), "paths": []}
    for name, piece in (("chunks (exact attention)", None), ("token by token (GroupQueryAttention)", 1)):
        st = engine.new_state()
        got = engine.feed(st, ids, all_logits=True, max_piece=piece)[-LAST:]
        lq = log_softmax(got)
        row = {"path": name, "mean_kl": float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1))),
               "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
               "rows_held": int((st.rows.token >= 0).sum())}
        out["paths"].append(row)
        print(f"{name}: KL {row['mean_kl']:.4f}, top-1 {row['top1_agreement']:.3f}, rows held {row['rows_held']} "
              f"(reference {out['reference_rows_held']})")
    out["command"] = "python bench/decode_paths.py BUNDLE"
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
