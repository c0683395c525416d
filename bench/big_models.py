"""Bigger models on a Pi: export time and peak RAM, bundle size, RSS and decode speed, per weight format.

Real shapes, random weights built in-process (no download): a Qwen2.5-0.5B-shaped and a
Llama-3.2-1B-shaped checkpoint, saved as bf16 safetensors like the released ones, exported with
`cortex-edge export` (int8 and int4) in a child process whose peak RSS is measured, then
`cortex-edge bench` on the bundle (RSS, decode ms/token, and its Pi 5 estimate from bytes per token).

    python bench/big_models.py --json bench/results/big_models.json [--shapes qwen2.5-0.5b,llama-3.2-1b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # the released configs' shapes (public model cards), random weights
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                   sliding_window=32768, use_sliding_window=False)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                                    "rope_theta": 500000.0})),
}


def make_checkpoint(shape: str, out: Path) -> None:
    import torch
    import transformers

    from cortex_edge.export.builtin import byte_tokenizer

    arch, kw = SHAPES[shape]
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls[0])(**kw)
    with torch.device("meta"):
        model = getattr(transformers, cls[1])(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    model.tie_weights()  # to_empty() broke the tie: one matrix again, as the released checkpoints store it
    model.save_pretrained(out)
    # a byte-level tokenizer: the bundle's tokenizer does not change the graph's cost
    byte_tokenizer(kw["vocab_size"]).save(str(out / "tokenizer.json"))
    del model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen2.5-0.5b,llama-3.2-1b")
    ap.add_argument("--weights", default="int4,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", default="512,4k")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="cortex-big-"))
    env = {**os.environ, "CORTEX_EDGE_HOME": str(work / "home")}
    rows = []
    for shape in args.shapes.split(","):
        ckpt = work / shape
        if not (ckpt / "config.json").is_file():
            print(f"{shape}: building a random checkpoint", flush=True)
            make_checkpoint(shape, ckpt)
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        for weights in args.weights.split(","):
            out = work / f"{shape}-{weights}"
            if out.exists():
                shutil.rmtree(out)
            # each export in its own child so that its peak RSS is its own (ru_maxrss of children is a max)
            code = ("import resource, sys; from cortex_edge.cli import main\n"
                    "try:\n main(sys.argv[1:])\nfinally:\n"
                    " print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)\n")
            t0 = time.time()
            r = subprocess.run([sys.executable, "-c", code, "export", str(ckpt), "--out", str(out), "--weights",
                                weights, "--state", "int8"], capture_output=True, text=True, env=env)
            secs = time.time() - t0
            peak = next((int(x.split()[1]) for x in r.stdout.splitlines() if x.startswith("peak")), None)
            if r.returncode:
                raise SystemExit(f"export {shape} {weights} failed:\n{r.stderr[-3000:]}")
            size = sum(f.stat().st_size for f in out.iterdir())
            bj = work / f"{shape}-{weights}-bench.json"
            b = subprocess.run([sys.executable, "-m", "cortex_edge", "bench", str(out), "--context", args.context,
                                "--threads", str(args.threads), "--new-tokens", "16", "--json", str(bj)],
                               capture_output=True, text=True, env=env)
            if b.returncode:
                raise SystemExit(f"bench {shape} {weights} failed:\n{b.stderr[-3000:]}")
            rep = json.loads(bj.read_text())
            row = {"shape": shape, "weights": weights, "checkpoint_bytes": ckpt_bytes, "export_seconds": round(secs, 1),
                   "export_peak_rss_bytes": peak, "bundle_bytes": size,
                   "peak_rss_bytes": rep["peak_rss_bytes"], "bytes_read_per_token": rep["bytes_read_per_token"],
                   "pi5_estimate_tokens_per_s": rep["pi5_estimate_tokens_per_s"],
                   "decode_ms_p50": {str(x["context"]): x["decode_ms_p50"] for x in rep["results"]},
                   "threads": rep["threads"], "cpu": rep["cpu"]["model"]}
            rows.append(row)
            print(f"{shape} {weights}: export {secs:.0f} s, peak {peak / 2**30:.1f} GiB; bundle {size / 2**20:.0f} MiB; "
                  f"RSS {rep['peak_rss_bytes'] / 2**20:.0f} MiB; decode p50 {row['decode_ms_p50']} ms; "
                  f"Pi 5 estimate {rep['pi5_estimate_tokens_per_s']:.1f} tok/s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=1))
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
