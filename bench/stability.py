"""The stability experiment: CortexGPT's naive memory design against the stable recipe, same data, same seed.

    python bench/stability.py --steps 600 --json bench/results/stability.json --plot bench/results/stability.png

Both runs train builtin:recall's model from the same seed on the same batches (cortex_edge.model.train;
the two recipes are described there). Reported per recipe:
  oscillation ratio   max / min of the per-step training loss inside every sliding window of 50 steps,
                      after the first 20 % of training (the initial descent is not oscillation);
                      median and worst window. Also on the loss of a fixed evaluation batch.
  gradient norms      per parameter group (backbone, memory) before clipping: median, 99th percentile, max
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
    recipe, steps, seed = args
    import torch

    from cortex_edge.model import train as tr

    torch.set_num_threads(1)
    tc = tr.TrainConfig(recipe=recipe, steps=steps, seed=seed, eval_every=10)
    _, hist = tr.train(tc)
    return recipe, hist


def summarize(hist: list[dict]) -> dict:
    from cortex_edge.model.train import oscillation

    loss = [h["loss"] for h in hist]
    ev = [h["eval"]["loss"] for h in hist if "eval" in h]
    spikes = [h["step"] for i, h in enumerate(hist) if i >= 50 and h["loss"] > 2 * np.median(loss[i - 50:i])]
    gn = {g: np.array([h[f"grad_norm_{g}"] for h in hist]) for g in ("backbone", "memory")}
    last = next(h["eval"] for h in reversed(hist) if "eval" in h)
    return {"oscillation_train": oscillation(loss), "oscillation_eval": oscillation(ev, window=5),
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
        ax[0].plot(s, [h["loss"] for h in hist], lw=0.7, label=recipe)
        ev = [(h["step"], h["eval"]["loss"]) for h in hist if "eval" in h]
        ax[1].plot(*zip(*ev), marker=".", label=recipe)
        ax[2].semilogy(s, [h["grad_norm_memory"] + 1e-9 for h in hist], lw=0.7, label=f"{recipe} memory")
        ax[2].semilogy(s, [h["grad_norm_backbone"] + 1e-9 for h in hist], lw=0.7, ls="--", label=f"{recipe} backbone")
    ax[0].set_title("training loss per step")
    ax[1].set_title("loss on a fixed batch")
    ax[2].set_title("gradient norm before clipping")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    t0 = time.time()
    with mp.get_context("spawn").Pool(2) as pool:
        out = dict(pool.map(one, [("naive", a.steps, a.seed), ("stable", a.steps, a.seed)]))
    res = {"steps": a.steps, "seed": a.seed, "summary": {r: summarize(h) for r, h in out.items()}, "history": out,
           "wall_s": round(time.time() - t0, 1)}
    for r, s in res["summary"].items():
        o, oe = s["oscillation_train"], s["oscillation_eval"]
        print(f"{r:>7}: oscillation (train, 50-step windows) median {o['median']:.2f}x worst {o['worst']:.2f}x; "
              f"(fixed batch) median {oe['median']:.2f}x worst {oe['worst']:.2f}x; spikes {s['loss_spikes']}; "
              f"grad norm memory p99 {s['grad_norm']['memory']['p99']:.3f} backbone p99 {s['grad_norm']['backbone']['p99']:.3f}; "
              f"final exact {s['final_eval']['answer_exact']:.3f} loss {s['final_eval']['loss']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.plot:
        plot(res, a.plot)


if __name__ == "__main__":
    main()
