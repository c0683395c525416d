"""Build a bundle folder: export -> quantize -> write -> validate -> manifest (with sha256 of every file).

The folder is assembled next to the destination and renamed into place at the end, so a failed
export never leaves half a bundle behind. What this leaves out: model loading (builtin.py, ...).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import cortex_edge
from cortex_edge import contract
from cortex_edge.export import onnx_export, validate
from cortex_edge.model.lm import CortexLM
from cortex_edge.quantize.weights import quantize_graph
from cortex_edge.runtime.bundle import fingerprint, sha256_file


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"  {msg}", flush=True)


def write_bundle(model: CortexLM, tokenizer, tok_meta: dict, out: Path, weights: str = contract.DEFAULT_WEIGHTS,
                 state: str = contract.DEFAULT_STATE, source: str = "", force: bool = False,
                 quiet: bool = False) -> dict:
    if weights not in contract.WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}")
    if state not in contract.STATE_FORMATS:
        raise ValueError(f"unknown state format {state!r}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.cfg
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".cortex-export-") as tmp:
        tmp = Path(tmp)
        work, bdir = tmp / "fp32", tmp / "bundle"
        work.mkdir()
        bdir.mkdir()
        _progress("exporting the ONNX graph", quiet)
        onnx_export.export_graph(model, work / contract.GRAPH)
        _progress("validating the graph against torch", quiet)
        graphs = validate.validate_graphs(model, work / contract.GRAPH)
        if not graphs["passed"]:
            raise validate.ValidationError(f"ONNX graph differs from torch by {graphs['worst']:.2e} of the "
                                           f"output scale (> {contract.RTOL_VALIDATION})")
        _progress(f"quantizing weights ({weights})", quiet)
        qrep = {contract.GRAPH: quantize_graph(work / contract.GRAPH, bdir / contract.GRAPH, weights)}
        tokenizer.save(str(bdir / contract.TOKENIZER))
        save_file({k: np.ascontiguousarray(v) for k, v in model.cms_write.numpy_weights().items()},
                  str(bdir / contract.CMS_WRITE_WEIGHTS))
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(bdir.iterdir())}
        manifest = {
            "format": contract.BUNDLE_FORMAT,
            "contract_version": contract.CONTRACT_VERSION,
            "created_by": f"cortex-edge {cortex_edge.__version__}",
            "model": {"source": source, "config": cfg.to_dict(),
                      "parameters": int(sum(p.numel() for p in model.parameters()))},
            "weights": weights,
            "state": state,
            "tokenizer": tok_meta,
            "quantization": qrep,
            "files": files,
            "fingerprint": fingerprint(files, cfg.to_dict(), weights, state, tok_meta),
        }
        (bdir / contract.MANIFEST).write_text(json.dumps(manifest, indent=1))
        _progress("validating the bundle through the runtime (300 tokens)", quiet)
        stream = validate.validate_stream(model, bdir)
        if weights == "fp32" and state == "fp32":
            validate.check_exact(stream)
        manifest["validation"] = {"graphs": graphs, "stream": stream, "seconds": round(time.time() - t0, 1)}
        (bdir / contract.MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        bdir.rename(out)
    return manifest
