"""Decode at one history, engines alternating round by round: a fairer ratio on a shared machine than one race.

  python bench/race_pairs.py --bundle BUNDLE [--history 512] [--rounds 3] [--threads 2] [--genai-peer]
                             [--work DIR] [--llama-bench DIR] [--json bench/results/race_512_pairs.json]

Each round runs llama.cpp Q8_0 (the race's build and requantized GGUF: bench/race.py), then `cortex-edge bench`
on BUNDLE, then (--genai-peer) onnxruntime-genai's int4 graph (bench/genai_peer.py), each decoding 64 tokens
after the history; the ratio is taken within the round, so a slow minute of the machine slows both sides.
What this leaves out: prefill and RSS (bench/race.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import race


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--history", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genai-peer", action="store_true")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cortex-edge-race"))
    ap.add_argument("--llama-bench", default=None, help="folder holding llama-bench and llama-quantize")
    ap.add_argument("--json", default="bench/results/race_512_pairs.json")
    a = ap.parse_args()
    work = Path(a.work)
    bin_dir = Path(a.llama_bench) if a.llama_bench else race.build_llama(work)
    q80 = work / "SmolLM2-135M-Instruct.Q8_0.gguf"
    if not q80.exists():
        from cortex_edge.export.loaders import smollm2_path
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(smollm2_path()), str(q80), "Q8_0"],
                       check=True, capture_output=True)
    rounds = []
    for i in range(a.rounds):
        row = {"round": i + 1}
        row["llama_cpp_q8_0_tok_s"] = race.llama_runs(bin_dir, q80, "Q8_0", a.threads, [a.history], 64)[0][
            "decode_tokens_per_s"]
        c = race.cortex_runs("int8", a.bundle, a.threads, [a.history], 64, work)[0]
        row["cortex_int8_tok_s"], row["cortex_int8_p50_ms"] = c["decode_tokens_per_s"], c["decode_ms_p50"]
        row["ratio"] = row["cortex_int8_tok_s"] / row["llama_cpp_q8_0_tok_s"]
        if a.genai_peer:
            g = race.genai_peer_runs(work, a.threads, [a.history], 64)[0]
            row["genai_int4_tok_s"] = g["decode_tokens_per_s"]
            row["genai_ratio"] = g["decode_tokens_per_s"] / row["llama_cpp_q8_0_tok_s"]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    out = {"what": f"decode after {a.history} tokens of history, {a.threads} threads, engines alternating round by "
                   "round (llama.cpp Q8_0: llama-bench -n 64 -r 2; cortex-edge bench --new-tokens 64"
                   + ("; onnxruntime-genai int4, 64 tokens" if a.genai_peer else "") + ")",
           "rows": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds),
           "command": f"python bench/race_pairs.py --bundle BUNDLE --history {a.history} --rounds {a.rounds}"
                      + (" --genai-peer" if a.genai_peer else "")}
    if a.genai_peer:
        out["median_genai_ratio"] = statistics.median(r["genai_ratio"] for r in rounds)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"median ratio to llama.cpp Q8_0: cortex-edge {out['median_ratio']:.2f}"
          + (f", onnxruntime-genai {out['median_genai_ratio']:.2f}" if a.genai_peer else ""))


if __name__ == "__main__":
    main()
