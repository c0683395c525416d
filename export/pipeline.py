"""`cortex-edge export MODEL`: resolve MODEL to a torch model + tokenizer, then write the bundle.

MODEL: builtin:tiny now (GGUF files and Hugging Face folders come with the real-model loader).
"""

from __future__ import annotations

from pathlib import Path

from cortex_edge import contract
from cortex_edge.runtime.errors import CortexError


def load_source(model: str):
    from cortex_edge.export import builtin

    if model in builtin.BUILTINS:
        return builtin.builtin(model)
    if model.startswith("builtin:"):
        raise CortexError(f"unknown builtin model {model!r} (known: {', '.join(builtin.BUILTINS)})")
    p = Path(model)
    if not p.exists():
        raise CortexError(f"model not found: {model}")
    raise CortexError(f"cannot load {model}: only {', '.join(builtin.BUILTINS)} is supported in this version")


def export_model(model: str, out: Path, weights: str = contract.DEFAULT_WEIGHTS, state: str = contract.DEFAULT_STATE,
                 force: bool = False, quiet: bool = False) -> dict:
    from cortex_edge.export.bundle_writer import write_bundle

    lm, tok, meta = load_source(model)
    return write_bundle(lm, tok, meta, out, weights=weights, state=state, source=model, force=force, quiet=quiet)
