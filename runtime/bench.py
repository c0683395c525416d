"""On-device measurement: time to first token, prefill, decode latency, RSS, state size vs caches.

NumPy + onnxruntime + psutil. Speeds are measured here, never asserted in tests.
What this leaves out: comparisons with peers (bench/ scripts at the repo root).
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from cortex_edge.runtime.engine import Engine

PI5_CACHES = {"L1d": 64 << 10, "L2": 512 << 10, "L3": 2 << 20}  # per core L1d, L2; shared L3
PI5_READ_GBPS = 9.0  # measured streaming read on a Pi 5 (single thread)
WARMUP = 2  # decode steps after the prefill that are not timed (as llama-bench warms up before timing)


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(s.rstrip("KMG")) * mult


def cpu_caches() -> dict:
    """Cache sizes of cpu0 from sysfs; Pi 5 figures where absent."""
    out: dict = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            if kind == "Instruction":
                continue
            out[f"L{level}" + ("d" if kind == "Data" else "")] = _parse_size((idx / "size").read_text())
    except OSError:
        pass
    source = "sysfs" if out else "pi5-defaults"
    if not out:
        out = dict(PI5_CACHES)
    out["source"] = source
    return out


def cpu_info() -> dict:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (x.strip() for x in line.split(":", 1))
                fields.setdefault(k.lower(), v)
    except OSError:
        pass
    # x86: "model name"; a Pi: "Model" (board) and "CPU part" 0xd0b (Cortex-A76)
    model = fields.get("model name") or fields.get("model") or fields.get("hardware") or platform.machine()
    if fields.get("cpu part") == "0xd0b":
        model = f"{model} (Cortex-A76)" if "A76" not in model else model
    freq = psutil.cpu_freq()
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "mhz": round(freq.current) if freq else None, "emulated": os.environ.get("ARM_EMULATED") == "1"}


def pi_thermal() -> dict | None:
    """SoC temperature and throttling flags on a Raspberry Pi (None elsewhere)."""
    out = {}
    try:
        out["temp_c"] = int(Path("/sys/class/thermal/thermal_zone0/temp").read_text()) / 1000
    except (OSError, ValueError):
        return None
    import shutil
    import subprocess

    if shutil.which("vcgencmd"):
        try:
            r = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5)
            out["throttled"] = r.stdout.strip().split("=")[-1]
        except (OSError, subprocess.SubprocessError):
            pass
    return out


class RSSSampler:
    """Samples this process's RSS every `every` seconds in a thread."""

    def __init__(self, every: float = 0.05):
        self.proc, self.every, self.samples = psutil.Process(), every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, self.proc.memory_info().rss))
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def peak(self) -> int:
        return max((r for _, r in self.samples), default=self.proc.memory_info().rss)


_BANDWIDTH_PROBE = """
import sys, time, numpy as np
a = np.ones(int(sys.argv[1]) << 18, dtype=np.float32)
a.sum()
while time.time() < float(sys.argv[2]):  # all readers start together
    pass
t = time.perf_counter()
for _ in range(8):
    a.sum()
print(8 * a.nbytes, time.perf_counter() - t)
"""


def read_bandwidth_gbps(threads: int = 1, mb: int = 256) -> float:
    """Streaming read bandwidth of `threads` cores reading at once (the decode's own thread count): each a
    NumPy sum over its own buffer, larger than the caches, 8 passes from a common start; total bytes over
    the slowest reader's time. In child processes, so the buffers never count in this process's RSS."""
    import subprocess
    import sys

    per = max(64, mb // max(1, threads))
    start = f"{time.time() + 1.0 + 0.2 * threads:.3f}"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", _BANDWIDTH_PROBE, str(per), start], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for _ in range(max(1, threads))]
        outs = [p.communicate(timeout=300)[0].split() for p in procs]
        return sum(float(o[0]) for o in outs) / max(float(o[1]) for o in outs) / 1e9
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return float("nan")


def weight_bytes(engine: Engine) -> int:
    """Weight bytes one decode step reads: the graph file less the embedding table, of which a token
    reads one row (fp16 in quantized bundles, fp32 in fp32 ones)."""
    from cortex_edge import contract

    c = engine.cfg
    row = 4 if engine.bundle.weights == "fp32" else 2
    return engine.bundle.manifest["files"][contract.GRAPH]["bytes"] - (c.vocab_size - 1) * c.dim * row


def bytes_per_token(engine: Engine, rows: int) -> int:
    """What a decode step reads: the weights (weight_bytes), and every layer's keys and values (fp32, or int8 in an
    8-bit cache) over the `rows` buffer rows in use (runtime/ring.py: the row level's, the sinks and the recent
    tokens)."""
    c = engine.cfg
    per = 1 if engine.kv_scales is not None else 4
    return weight_bytes(engine) + 2 * c.n_layers * c.n_kv_heads * rows * c.head_dim * per


def run_context(engine: Engine, context: int, new_tokens: int, seed: int = 0, progress=None) -> dict:
    rng = np.random.default_rng(seed)
    V = engine.cfg.vocab_size
    st = engine.new_state()
    t0 = time.perf_counter()
    step = max(engine.cfg.cms.chunk * 64, 1)
    for j in range(0, context, step):  # ids made piece by piece: the history is never held in memory
        n = min(step, context - j)
        engine.feed(st, rng.integers(3, V, n))
        if progress:
            progress(n)
    prefill_s = time.perf_counter() - t0
    lat = []
    tok = int(rng.integers(3, V))
    t_first = None
    for i in range(new_tokens + WARMUP):
        t = time.perf_counter()
        logits = engine.feed(st, [tok])
        tok = int(np.argmax(logits))
        if i == 0:
            t_first = time.perf_counter() - t0
        if i >= WARMUP:
            lat.append(time.perf_counter() - t)
    ms = np.array(lat) * 1e3
    return {"context": context, "prefill_tokens_per_s": context / prefill_s if context else None,
            "prefill_s": prefill_s, "time_to_first_token_s": t_first,
            "decode_ms_p50": float(np.percentile(ms, 50)), "decode_ms_p95": float(np.percentile(ms, 95)),
            "decode_ms_p99": float(np.percentile(ms, 99)), "decode_tokens_per_s": float(1e3 / ms.mean()),
            "rss_bytes": psutil.Process().memory_info().rss, "events": st.events,
            "state_bytes_per_level": engine.state_bytes(st),
            "bytes_read_per_token": bytes_per_token(engine, st.used(engine.lay))}


def run(engine: Engine, contexts: list[int], new_tokens: int, show_progress: bool = True,
        bandwidth: float | None = None) -> dict:
    """bandwidth: read bandwidth in GB/s measured beforehand (the CLI measures it before loading the bundle,
    so that the probe's buffers (256 MB in all) and the session never coexist in a peak-RSS reading)."""
    from tqdm import tqdm

    caches = cpu_caches()
    thermal_before = pi_thermal()
    bw = read_bandwidth_gbps(engine.threads) if bandwidth is None else bandwidth
    results = []
    total = sum(contexts)
    with RSSSampler() as rss, tqdm(total=total, unit="tok", desc="prefill", disable=not show_progress
                                   or total < 2000, leave=False) as bar:
        for c in contexts:
            r = run_context(engine, c, new_tokens, progress=bar.update)
            r["peak_rss_bytes_so_far"] = rss.peak
            results.append(r)
    st = engine.new_state()
    levels = engine.state_bytes(st)
    # the steady state: weights and the buffers half way through a move of the region (ring.py; a short history
    # reads less: per history above)
    lay = engine.lay
    per_token_bytes = bytes_per_token(engine, lay.rows + lay.sinks + lay.window + (lay.chunk + lay.shift) // 2)
    out = {
        "bundle": str(engine.bundle.path), "weights": engine.bundle.weights, "state": engine.bundle.state_format,
        "kv_cache": engine.bundle.kv_cache,
        "threads": engine.threads, "cpu": cpu_info(), "caches": caches,
        "state_bytes_per_level": levels, "row_slots": engine.cfg.cms.rows,  # the row level, when present, comes last
        "state_fits": {"L2": sum(levels) <= caches.get("L2", PI5_CACHES["L2"]),  # the whole CMS state, one core's L2
                       "L3_total": sum(levels) <= caches.get("L3", PI5_CACHES["L3"])},
        "thermal_before": thermal_before, "thermal_after": pi_thermal(),
        "peak_rss_bytes": rss.peak, "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_trace": [[round(t, 3), r] for t, r in rss.samples[:: max(1, len(rss.samples) // 200)]],
        "read_bandwidth_gbps": bw, "bytes_read_per_token": per_token_bytes,
        "bandwidth_ceiling_tokens_per_s": bw * 1e9 / per_token_bytes,
        "pi5_estimate_tokens_per_s": PI5_READ_GBPS * 1e9 / per_token_bytes,
        "results": results,
    }
    return out


def check_plot() -> None:
    """Raise CortexError now if plot() could not run (matplotlib missing)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from cortex_edge.runtime.errors import CortexError

        raise CortexError("--plot needs matplotlib: pip install 'cortex-edge[plot]'")


def tokens_label(n: int) -> str:
    """512, 4k, 16k, 1M: how people write history lengths."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def plot(report: dict, path: str) -> None:
    check_plot()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = [r for r in report["results"] if r["context"] > 0] or report["results"]
    ctx = [max(1, r["context"]) for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(ctx, [r["decode_ms_p50"] for r in rows], "o-", label="p50")
    ax[0].plot(ctx, [r["decode_ms_p95"] for r in rows], "s--", label="p95")
    ax[0].set(ylabel="decode ms/token", title="decode latency")
    ax[0].legend()
    ttft = [r["time_to_first_token_s"] for r in rows]
    ax[1].plot(ctx, ttft, "o-", color="tab:green")
    ax[1].set(ylabel="time to first token (s)", title="prefill: history + prompt")
    for x, r in zip(ctx, rows):
        if r.get("prefill_tokens_per_s"):
            ax[1].annotate(f"{r['prefill_tokens_per_s']:.0f} tok/s", (x, r["time_to_first_token_s"]),
                           textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax[2].plot(ctx, [r["rss_bytes"] / 2**20 for r in rows], "o-", color="tab:red")
    ax[2].set(ylabel="RSS (MiB)", title="memory")
    for a in ax:
        a.set_xscale("log")
        a.xaxis.set_major_locator(FixedLocator(ctx))
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xticks(ctx, [tokens_label(c) for c in ctx])
        a.set_xlabel("history (tokens)")
        a.set_ylim(0, max(line.get_ydata().max() for line in a.get_lines()) * 1.15 or 1)
        a.grid(alpha=0.3)
    name = Path(str(report.get("bundle", ""))).name or "bundle"
    fig.suptitle(f"cortex-edge bench: {name} ({report.get('weights')} weights, {report.get('state')} state), "
                 f"{report.get('threads')} thread{'' if report.get('threads') == 1 else 's'}, {report.get('cpu', {}).get('model', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
