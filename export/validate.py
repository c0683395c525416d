"""Export validation against torch, output by output and state by state (as optimum's _run_validation).

Two checks, both written into the bundle manifest:
  graph    the fp32 ONNX graph against CortexLM.step on random inputs (T = 1, 3, C; an empty
           buffer and a moved one), every output, tolerance contract.RTOL_VALIDATION (an 8-bit cache:
           RTOL_VALIDATION_KV8, its int8 rows KV8_STEPS apart at most and rarely more than one); T = 1 runs
           the decode branch (GroupQueryAttention's maths in torch), T > 1 the chunk branch (the exact attention);
  stream   the finished bundle through the NumPy runtime (quantized weights and state included)
           against TorchStream on a 300-token run crossing the window and several memory events:
           logits, top-1 agreement, KL, and every CMS level's memory and keys.
What this leaves out: writing files (bundle_writer.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from cortex_edge import contract
from cortex_edge.export.onnx_export import GraphModule, example_inputs, run_torch
from cortex_edge.model.lm import CortexLM, TorchStream
from cortex_edge.runtime.errors import CortexError

STREAM_TOKENS = 300


class ValidationError(CortexError):
    pass


def validate_graphs(model: CortexLM, path: Path) -> dict:
    cfg = model.cfg
    modules = {True: GraphModule(model, gqa=True), False: GraphModule(model, gqa=False)}
    names = contract.output_names(cfg.n_layers)
    int8 = model.kv_scales is not None
    rtol = contract.RTOL_VALIDATION_KV8 if int8 else contract.RTOL_VALIDATION
    report: dict = {"rtol": rtol, "cases": [], "max_abs_diff": {}, "max_rel_diff": {}, "far_fraction": {}}
    worst = 0.0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t in sorted({1, min(3, cfg.cms.chunk), cfg.cms.chunk}):
        far = cfg.sinks + cfg.window + 7  # a full window, the region moved: the last t tokens of that chunk
        for n_past in (0, far - far % cfg.cms.chunk + cfg.cms.chunk - t):
            feed = example_inputs(cfg, t, n_past, seed=t * 1000 + n_past, logits_from=t - 1 if n_past else 0,
                                  int8=int8)
            got = sess.run(names, feed)
            ref = run_torch(modules[t == 1], feed)
            for name, g, r in zip(names, got, ref):
                diff = np.abs(g.astype(np.float64) - r)
                d = float(np.max(diff))
                if g.dtype == np.int8:  # an 8-bit cache's rows, in steps: a few flips are rounding, more an error
                    far = float(np.mean(diff > 1))
                    report["far_fraction"][name] = max(report["far_fraction"].get(name, 0.0), far)
                    rel = 0.0 if d <= contract.KV8_STEPS and far <= contract.KV8_FAR_FRACTION else max(d, 1.0)
                else:
                    rel = d / max(1.0, float(np.max(np.abs(r))))
                report["max_abs_diff"][name] = max(report["max_abs_diff"].get(name, 0.0), d)
                report["max_rel_diff"][name] = max(report["max_rel_diff"].get(name, 0.0), rel)
                worst = max(worst, rel)
            report["cases"].append({"graph": path.name, "T": t, "n_past": n_past,
                                    "logits_from": int(feed[contract.LOGITS_FROM])})
    report["worst"] = worst
    report["passed"] = worst <= rtol
    return report


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def validate_stream(model: CortexLM, bundle_dir: Path, tokens: int = STREAM_TOKENS, seed: int = 0) -> dict:
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    cfg = model.cfg
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, tokens)
    with torch.no_grad():
        ts = TorchStream(model)
        ref = ts.feed(torch.from_numpy(ids)[None])[0].numpy()  # (N, V)
    eng = Engine(load_bundle(bundle_dir), threads=1)
    st = eng.new_state()
    got = eng.feed(st, ids, all_logits=True)  # (N, V)
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    state = []
    for lvl, (m, k) in enumerate(st.views):
        state.append({"level": lvl, "mem_max_abs_diff": float(np.max(np.abs(m - ts.mems[lvl][0].numpy()))),
                      "keys_max_abs_diff": float(np.max(np.abs(k - ts.mem_keys[lvl][0].numpy()))),
                      "mem_norm": float(np.linalg.norm(ts.mems[lvl][0].numpy()))})
    return {"tokens": tokens, "events": st.events, "window_wrapped": tokens > cfg.sinks + cfg.window,
            "logits_max_abs_diff": float(np.max(np.abs(got - ref))), "logits_max_abs": float(np.max(np.abs(ref))),
            "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))), "mean_kl": kl, "state": state}


def check_exact(stream: dict) -> None:
    """fp32 weights + fp32 state must match torch to the named tolerance (relative to the scale)."""
    rel = stream["logits_max_abs_diff"] / max(1.0, stream["logits_max_abs"])
    if rel > contract.RTOL_VALIDATION:
        raise ValidationError(f"runtime logits differ from torch by {rel:.2e} of their scale "
                              f"> {contract.RTOL_VALIDATION}")
    if stream["top1_agreement"] < 0.99:
        raise ValidationError(f"runtime top-1 agrees with torch on only {stream['top1_agreement']:.3f} of tokens")
    for s in stream["state"]:
        worst = max(s["mem_max_abs_diff"], s["keys_max_abs_diff"]) / max(1.0, s["mem_norm"])
        if worst > contract.RTOL_VALIDATION:
            raise ValidationError(f"CMS level {s['level']} state differs from torch by {worst:.2e}")
