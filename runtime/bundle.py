"""Read and verify a bundle folder: manifest, contract version, formats, paths, sha256 of every file.

NumPy-free and torch-free. What this leaves out: running the graphs (engine.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortex_edge import contract
from cortex_edge.config import ConfigError, ModelConfig
from cortex_edge.runtime.errors import BundleError

MAX_MANIFEST_BYTES = 16 << 20
REQUIRED_FILES = (contract.GRAPH, contract.TOKENIZER, contract.CMS_WRITE_WEIGHTS)


# An ONNX TensorProto whose data lives in another file names it in an external_data entry keyed
# "location" (StringStringEntryProto field 1: tag 0x0a, length 8). The runtime reads only files the
# manifest lists and verifies, and the exporter writes self-contained graphs, so a graph naming one is refused.
EXTERNAL_DATA_MARK = b"\x0a\x08location"


def sha256_file(path: Path, find: bytes | None = None) -> str | tuple[str, bool]:
    """sha256 of a file; with find, also whether those bytes occur in it (same single pass)."""
    h = hashlib.sha256()
    found, tail = False, b""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            if find is not None and not found:
                found = find in tail + block
                tail = block[-len(find):]
    return (h.hexdigest(), found) if find is not None else h.hexdigest()


def safe_join(root: Path, name: Any) -> Path:
    """A path named by a bundle must stay inside the bundle."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"bundle names an invalid file path: {name!r}")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or p.drive:
        raise BundleError(f"bundle file path escapes the bundle: {name!r}")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise BundleError(f"bundle file path escapes the bundle: {name!r}")
    return full


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    config: ModelConfig

    @property
    def weights(self) -> str:
        return self.manifest["weights"]

    @property
    def state_format(self) -> str:
        return self.manifest["state"]

    @property
    def kv_cache(self) -> str:
        """The attention buffers' format (contract.KV_FORMATS; bundles from before it was a choice: fp32)."""
        return self.manifest.get("kv_cache", "fp32")

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def tokenizer_file(self) -> str:
        return self.manifest["tokenizer"].get("file", contract.TOKENIZER)

    def file(self, name: str) -> Path:
        """A file the runtime reads: only those the manifest lists (and load_bundle verified)."""
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle file {name!r} is not in the manifest's checksummed file list")
        return safe_join(self.path, name)


def read_manifest(path: Path) -> dict:
    mpath = path / contract.MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle not found: {path} is not a folder")
    if not mpath.is_file():
        raise BundleError(f"not a bundle: {mpath} is missing")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest too large: {mpath}")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except RecursionError:
        raise BundleError(f"manifest is nested too deeply: {mpath}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"manifest is not valid JSON: {mpath} ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise BundleError("manifest must be a JSON object")
    return manifest


def check_manifest(manifest: dict) -> ModelConfig:
    if manifest.get("format") != contract.BUNDLE_FORMAT:
        raise BundleError(f"not a cortex-edge bundle (format {manifest.get('format')!r})")
    cv = manifest.get("contract_version")
    if cv != contract.CONTRACT_VERSION:
        raise BundleError(f"bundle contract version {cv!r} is not supported (this runtime reads "
                          f"{contract.CONTRACT_VERSION}); re-export it with this version of cortex-edge")
    if manifest.get("weights") not in contract.WEIGHT_FORMATS:
        raise BundleError(f"unknown weight quantization {manifest.get('weights')!r} "
                          f"(expected one of {', '.join(contract.WEIGHT_FORMATS)})")
    if manifest.get("state") not in contract.STATE_FORMATS:
        raise BundleError(f"unknown state format {manifest.get('state')!r} "
                          f"(expected one of {', '.join(contract.STATE_FORMATS)})")
    if manifest.get("kv_cache", "fp32") not in contract.KV_FORMATS:
        raise BundleError(f"unknown attention cache format {manifest.get('kv_cache')!r} "
                          f"(expected one of {', '.join(contract.KV_FORMATS)})")
    if not isinstance(manifest.get("fingerprint"), str):
        raise BundleError("manifest has no fingerprint")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError("manifest has no file list")
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"manifest does not list the required file {name}")
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("stop_ids", []), list):
        raise BundleError("manifest has no valid tokenizer section")
    tfile = tok.get("file", contract.TOKENIZER)
    if not isinstance(tfile, str) or tfile not in files:
        raise BundleError(f"manifest's tokenizer file {tfile!r} is not in its checksummed file list")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in tok.get("stop_ids", [])):
        raise BundleError("manifest's tokenizer stop_ids must be integers")
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise BundleError("manifest has no model section")
    try:
        return ModelConfig.from_dict(model.get("config"))
    except (ConfigError, TypeError, ValueError) as e:
        raise BundleError(f"manifest model config is invalid: {e}") from None


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    root = Path(path)
    manifest = read_manifest(root)
    cfg = check_manifest(manifest)
    for name, meta in manifest["files"].items():
        full = safe_join(root, name)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise BundleError(f"manifest entry for {name} has no sha256")
        if not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool) or meta["bytes"] < 0:
            raise BundleError(f"manifest entry for {name} has no valid byte count")
        if not full.is_file():
            raise BundleError(f"bundle file missing: {name}")
        if verify:
            if full.stat().st_size != meta["bytes"]:
                raise BundleError(f"bundle file {name} has {full.stat().st_size} bytes, manifest says "
                                  f"{meta['bytes']} (truncated or replaced)")
            digest, external = sha256_file(full, EXTERNAL_DATA_MARK) if name == contract.GRAPH else \
                (sha256_file(full), False)
            if digest != meta["sha256"]:
                raise BundleError(f"checksum mismatch for bundle file {name} (damaged or replaced)")
            if name == contract.GRAPH and external:
                raise BundleError(f"{name} refers to external data files: this runtime reads only self-contained "
                                  "graphs (every file it reads is listed and verified)")
    expect = fingerprint(manifest["files"], manifest["model"]["config"], manifest["weights"], manifest["state"],
                         manifest["tokenizer"])
    if manifest["fingerprint"] != expect:
        raise BundleError("manifest fingerprint mismatch: its config, formats, tokenizer or file list were edited")
    return Bundle(path=root, manifest=manifest, config=cfg)


def fingerprint(files: dict[str, dict], config: dict, weights: str, state: str, tokenizer: dict) -> str:
    """Identifies what a bundle computes: sessions made with one bundle are refused by another."""
    h = hashlib.sha256()
    h.update(json.dumps({"files": {k: v["sha256"] for k, v in sorted(files.items())}, "config": config,
                         "weights": weights, "state": state, "tokenizer": tokenizer}, sort_keys=True).encode())
    return h.hexdigest()[:32]
