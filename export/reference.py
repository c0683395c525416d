"""The loaded torch model against an independent implementation of the same checkpoint (transformers).

The export's own validation compares the ONNX graph with the project's torch model; that cannot see
a field the loader misread. When transformers is installed, this loads the same checkpoint with it
and compares logits and greedy tokens, so a converter bug is caught before a bundle is written.
What this leaves out: the graph (validate.py) and builtin models (they have no other implementation).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from cortex_edge.runtime.errors import CortexError

TOKENS = 64  # prompt length compared
ATOL_REFERENCE = 1e-3  # max |logit difference| allowed, fp32 (30 layers, 49k vocabulary: see test_parity_hf)


class ReferenceMismatch(CortexError):
    pass


def compare(model, source: Path) -> dict | None:
    """None when transformers is absent; else {library, tokens, max_abs_logit_diff, top1_agreement}.
    Raises ReferenceMismatch when the two disagree beyond ATOL_REFERENCE."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from cortex_edge.model.lm import TorchStream

    source = Path(source)
    kw = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    where = source.parent if source.suffix == ".gguf" else source
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kw).eval()
    except Exception as e:  # transformers cannot read it: nothing to compare with, say so in the manifest
        return {"library": f"transformers {transformers.__version__}", "skipped": f"{e.__class__.__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}"}
    n = min(TOKENS, model.cfg.window)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, n).tolist()
    with torch.no_grad():
        ours = TorchStream(model).feed(torch.tensor([ids]))[0]
        ref = hf(torch.tensor([ids])).logits[0].float()
    diff = float((ours - ref).abs().max())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    rep = {"library": f"transformers {transformers.__version__}", "tokens": n, "max_abs_logit_diff": diff,
           "top1_agreement": top1}
    if not diff <= ATOL_REFERENCE:
        raise ReferenceMismatch(f"the converted model differs from transformers on this checkpoint (max |dlogit| "
                                f"{diff:.3g} > {ATOL_REFERENCE}, top-1 {top1:.3f}): refusing to write a bundle "
                                "that computes something else")
    return rep
