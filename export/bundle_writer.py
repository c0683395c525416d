"""Build a bundle folder: export -> quantize -> write -> validate -> manifest (with sha256 of every file).

The folder is assembled next to the destination and renamed into place at the end, so a failed
export never leaves half a bundle behind. What this leaves out: model loading (builtin.py, ...).
"""

from __future__ import annotations

import json
import os
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

STAGES = 5  # export, validate graph, quantize, write, validate through the runtime


class _Progress:
    """A tqdm bar over the export's stages (stderr), or nothing when quiet."""

    def __init__(self, quiet: bool, calibrate: bool = False):
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=STAGES + calibrate, bar_format="{desc:<52} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")

    def __call__(self, msg: str) -> None:
        if self.bar is not None:
            if self.bar.desc:
                self.bar.update(1)
            self.bar.set_description_str(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def check_replaceable(out: Path) -> None:
    """--force replaces a bundle folder or an empty one, never anything else (a user's folder of files)."""
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: --force replaces only a bundle folder")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    try:
        manifest = json.loads((out / contract.MANIFEST).read_text())
        is_bundle = isinstance(manifest, dict) and manifest.get("format") == contract.BUNDLE_FORMAT
        listed = set(manifest.get("files", {})) | {contract.MANIFEST} if is_bundle else set()
    except (OSError, ValueError, AttributeError, RecursionError):
        is_bundle, listed = False, set()
    if not is_bundle:
        raise FileExistsError(f"{out} is not a cortex-edge bundle: --force replaces only a bundle folder (or an "
                              "empty one); choose another --out")
    extra = sorted(names - listed)
    if extra:
        raise FileExistsError(f"{out} holds files that are not part of its bundle ({', '.join(extra[:3])}): "
                              "--force will not delete them; choose another --out")


def _readable(folder: Path) -> None:
    """The bundle as the user's umask makes new files (tempfile makes 0700 folders and safetensors 0600 files):
    a bundle copied to, or shared with, another user must still load."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def write_bundle(model: CortexLM, tokenizer, tok_meta: dict, out: Path, weights: str = contract.DEFAULT_WEIGHTS,
                 state: str = contract.DEFAULT_STATE, source: str = "", force: bool = False,
                 quiet: bool = False, reference: dict | None = None, kv: str = contract.DEFAULT_KV) -> dict:
    """reference: the loaded model against an independent implementation (export/reference.py), recorded.
    kv: the attention buffers' format (contract.KV_FORMATS); int8 calibrates its scales on the model first."""
    if weights not in contract.WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}")
    if state not in contract.STATE_FORMATS:
        raise ValueError(f"unknown state format {state!r}")
    if kv not in contract.KV_FORMATS:
        raise ValueError(f"unknown attention cache format {kv!r}")
    out = Path(out)
    if os.path.lexists(out):
        if not force:
            raise FileExistsError(f"{out} already exists (pass --force to replace it)")
        check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.cfg
    t0 = time.time()
    progress = _Progress(quiet, kv == "int8")
    kv_scales = None
    if kv == "int8":
        from cortex_edge.export import kv_calibrate

        progress("calibrating the 8-bit attention cache")
        kv_scales = kv_calibrate.calibrate(model, kv_calibrate.calibration_ids(tokenizer, cfg.vocab_size, tok_meta))
        model = model.with_kv_cache(kv_scales)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".cortex-export-") as tmp:
        tmp = Path(tmp)
        work, bdir = tmp / "fp32", tmp / "bundle"
        work.mkdir()
        bdir.mkdir()
        progress("exporting the ONNX graph")
        onnx_export.export_graph(model, work / contract.GRAPH)
        progress("validating the graph against torch")
        graphs = validate.validate_graphs(model, work / contract.GRAPH)
        if not graphs["passed"]:
            raise validate.ValidationError(f"ONNX graph differs from torch by {graphs['worst']:.2e} of the "
                                           f"output scale (> {graphs['rtol']})")
        progress(f"quantizing weights ({weights})")
        qrep = {contract.GRAPH: quantize_graph(work / contract.GRAPH, bdir / contract.GRAPH, weights)}
        progress("writing the bundle")
        tokenizer.save(str(bdir / contract.TOKENIZER))
        save_file({k: np.ascontiguousarray(v) for k, v in model.cms_write.numpy_weights().items()},
                  str(bdir / contract.CMS_WRITE_WEIGHTS))
        if kv_scales is not None:
            save_file({name(i): s for i, sc in enumerate(kv_scales) for name, s in
                       zip((contract.key_scale, contract.value_scale), sc)}, str(bdir / contract.KV_SCALES))
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(bdir.iterdir())}
        manifest = {
            "format": contract.BUNDLE_FORMAT,
            "contract_version": contract.CONTRACT_VERSION,
            "created_by": f"cortex-edge {cortex_edge.__version__}",
            "model": {"source": source, "config": cfg.to_dict(),
                      "parameters": int(sum(p.numel() for p in model.parameters()))},
            "weights": weights,
            "state": state,
            "kv_cache": kv,
            "tokenizer": tok_meta,
            "quantization": qrep,
            "files": files,
            "fingerprint": fingerprint(files, cfg.to_dict(), weights, state, tok_meta),
        }
        (bdir / contract.MANIFEST).write_text(json.dumps(manifest, indent=1))
        progress("validating through the runtime (300 tokens)")
        stream = validate.validate_stream(model, bdir)
        if weights == "fp32" and state == "fp32":
            validate.check_exact(stream)
        manifest["validation"] = {"graphs": graphs, "stream": stream, "seconds": round(time.time() - t0, 1)}
        if reference is not None:
            manifest["validation"]["reference"] = reference
        (bdir / contract.MANIFEST).write_text(json.dumps(manifest, indent=1))
        _readable(bdir)
        if os.path.lexists(out):
            check_replaceable(out)  # again: it may have changed during the export
            old = tmp / "replaced"
            out.rename(old)  # out is swapped in one rename; the old bundle goes with the temporary folder
        bdir.rename(out)
    progress.close()
    return manifest
