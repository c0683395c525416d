"""The stability experiment: CortexGPT's naive memory design against the stable recipe, same data, same seed.

    python bench/stability.py --json bench/results/stability.json --plot bench/results/stability.png \
        --save-stable export/data/recall.safetensors

Both runs train builtin:recall's model from the same seed on the same batches (cortex_edge.model.train;
the two recipes are described there). Reported per recipe:
  oscillation ratio   max / min of the task loss (answer CE + lm_weight x LM CE: what both recipes optimise;
                      the gate cost and the probe are left out) inside every sliding window of 50 steps,
                      over the last stage of the curriculum after its first 100 steps (a stage change and
                      the first descent are not oscillation); median and worst window. The same on the
                      loss of a fixed evaluation batch (every 10 steps, windows of 5 evaluations), which
                      has no batch-to-batch sampling noise. The whole-run figures are reported too.
                      Detrended: the same on the fixed-batch loss divided by its running median over 9
                      evaluations, so that a fast, steady descent (learning) does not count as a swing.
  gradient norms      per parameter group (backbone, memory) before clipping: median, 99th percentile, max
  long stage          the same on the fixed batch of the long stage (1,024-token haystacks), windows of 5
  loss spikes         steps whose loss exceeds 2x the median of the 50 steps before
  final               answer exact-match and losses on the fixed batch
The two runs go in parallel, one thread each (this machine has two cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np


def one(args):
    recipe, steps, seed, save = args
    import torch

    from cortex_edge.model import train as tr

    torch.set_num_threads(1)
    tc = tr.TrainConfig(recipe=recipe, steps=steps, seed=seed, eval_every=10)
    _, hist = tr.train(tc, out=Path(save) if save else None)
    return recipe, hist


def detrend(x: list[float], k: int = 9) -> list[float]:
    """x / its running median over k points: a steady descent becomes ~1, a swing stays a swing."""
    a = np.asarray(x, dtype=np.float64)
    med = np.array([np.median(a[max(0, i - k // 2):i + k // 2 + 1]) for i in range(len(a))])
    return list(a / np.maximum(med, 1e-12))


def summarize(hist: list[dict]) -> dict:
    from cortex_edge.model.train import TrainConfig, oscillation

    tc = TrainConfig()
    start = int(tc.stages[-2][0] * tc.steps) + 100 if len(tc.stages) > 1 else int(0.2 * tc.steps)
    long_ev = [h["eval"]["loss"] for h in hist[tc.steps:] if "eval" in h]
    hist = hist[:tc.steps]  # the curriculum; the long stage after it is reported on its own
    task = [h["answer_loss"] + tc.lm_weight * h["lm_loss"] for h in hist]
    loss = task[start:]
    ev = [h["eval"]["loss"] for h in hist[start:] if "eval" in h]
    spikes = [hist[start + i]["step"] for i in range(50, len(loss)) if loss[i] > 2 * np.median(loss[i - 50:i])]
    gn = {g: np.array([h[f"grad_norm_{g}"] for h in hist]) for g in ("backbone", "memory")}
    last = next(h["eval"] for h in reversed(hist) if "eval" in h)
    return {"oscillation_train": oscillation(loss, skip=0.0), "oscillation_eval": oscillation(ev, window=5, skip=0.0),
            "oscillation_eval_detrended": oscillation(detrend(ev), window=5, skip=0.0),
            "from_step": start + 1,
            "long_stage_eval": oscillation(long_ev, window=5, skip=0.0) if len(long_ev) >= 2 else None,
            "long_stage_eval_range": [min(long_ev), max(long_ev)] if long_ev else None,
            "whole_run": {"train": oscillation(task), "eval": oscillation([h["eval"]["loss"] for h in hist if "eval" in h],
                                                                          window=5)},
            "loss_spikes": len(spikes), "spike_steps": spikes[:20],
            "grad_norm": {g: {"median": float(np.median(v)), "p99": float(np.percentile(v, 99)), "max": float(v.max())}
                          for g, v in gn.items()},
            "final_eval": last, "seconds": hist[-1]["seconds"]}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for recipe, hist in res["history"].items():
        s = [h["step"] for h in hist]
        ax[0].plot(s, [h["answer_loss"] + 0.1 * h["lm_loss"] for h in hist], lw=0.7, label=recipe)
        ev = [(h["step"], h["eval"]["loss"]) for h in hist if "eval" in h]
        ax[1].plot(*zip(*ev), marker=".", label=recipe)
        ax[2].semilogy(s, [h["grad_norm_memory"] + 1e-9 for h in hist], lw=0.7, label=f"{recipe} memory")
        ax[2].semilogy(s, [h["grad_norm_backbone"] + 1e-9 for h in hist], lw=0.7, ls="--", label=f"{recipe} backbone")
    ax[0].set_title("task loss per step (answer + 0.1 LM)")
    ax[1].set_title("loss on a fixed batch")
    ax[2].set_title("gradient norm before clipping")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(res: dict) -> None:
    for r, s in res["summary"].items():
        o, oe = s["oscillation_train"], s["oscillation_eval"]
        print(f"{r:>7}: oscillation from step {s['from_step']} (train, 50-step windows) median {o['median']:.2f}x "
              f"worst {o['worst']:.2f}x; (fixed batch) median {oe['median']:.2f}x worst {oe['worst']:.2f}x; "
              f"(detrended) worst {s['oscillation_eval_detrended']['worst']:.2f}x; "
              f"long stage (fixed batch) worst {s['long_stage_eval']['worst'] if s['long_stage_eval'] else float('nan'):.2f}x; "
              f"spikes {s['loss_spikes']}; grad norm memory p99 {s['grad_norm']['memory']['p99']:.3f} "
              f"backbone p99 {s['grad_norm']['backbone']['p99']:.3f}; final exact {s['final_eval']['answer_exact']:.3f} "
              f"loss {s['final_eval']['loss']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="default: the training recipe's")
    ap.add_argument("--save-stable", default=None, help="also write the stable run's checkpoint here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None, help="re-summarise and re-plot a saved run instead of training")
    a = ap.parse_args()
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        res["summary"] = {r: summarize(h) for r, h in res["history"].items()}
        report(res)
        if a.json:
            Path(a.json).write_text(json.dumps(res, separators=(",", ":")))
        if a.plot:
            plot(res, a.plot)
        return
    t0 = time.time()
    with mp.get_context("spawn").Pool(2) as pool:
        from cortex_edge.model.train import TrainConfig

        steps = a.steps or TrainConfig().steps
        out = dict(pool.map(one, [("naive", steps, a.seed, None), ("stable", steps, a.seed, a.save_stable)]))
    res = {"steps": steps, "seed": a.seed, "summary": {r: summarize(h) for r, h in out.items()}, "history": out,
           "wall_s": round(time.time() - t0, 1)}
    report(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, separators=(",", ":")))
    if a.plot:
        plot(res, a.plot)


if __name__ == "__main__":
    main()
