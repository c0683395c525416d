"""Built-in models (no download): `builtin:tiny`, made in-process from a seed, and `builtin:recall`,
the model `cortex-edge train` taught pass-key recall, shipped as a checkpoint in export/data.

The tokenizer is byte-level (256 byte tokens + ChatML specials) built with HF `tokenizers`.
What this leaves out: real checkpoints (GGUF / HF folders).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from cortex_edge.config import ModelConfig, tiny_config

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTINS = {"builtin:tiny": (tiny_config, 1234), "builtin:recall": None}
RECALL_CHECKPOINT = Path(__file__).parent / "data" / "recall.safetensors"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b, ch in sorted(bytes_to_unicode().items()):
        vocab[ch] = len(SPECIALS) + b
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def tokenizer_meta() -> dict:
    return {"file": "tokenizer.json", "chat_template": CHATML, "bos": "", "stop_ids": [0, 2],
            "stop_tokens": ["<|endoftext|>", "<|im_end|>"]}


def builtin(name: str):
    """-> (model, tokenizer, tokenizer meta). Imports torch."""
    from cortex_edge.model.lm import build

    if name not in BUILTINS:
        raise KeyError(name)
    if name == "builtin:recall":
        return checkpoint(RECALL_CHECKPOINT)
    import torch

    make_cfg, seed = BUILTINS[name]
    cfg: ModelConfig = make_cfg()
    model = build(cfg, seed)
    # An untrained sidecar is exactly silent (W_o = 0). The builtin demo model gets a random W_o
    # from its seed so that its memory visibly changes what it says (and every test exercises it).
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = model.cms_read.out.weight
        w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
        model.cms_read.gate.bias.fill_(0.0)
    return model, byte_tokenizer(cfg.vocab_size), tokenizer_meta()


def checkpoint(path: Path):
    """A `cortex-edge train` checkpoint (byte-level model) -> (model, tokenizer, tokenizer meta)."""
    from cortex_edge.model.train import load_checkpoint
    from cortex_edge.runtime.errors import CortexError

    if not Path(path).is_file():
        raise CortexError(f"checkpoint not found: {path} (make one with: cortex-edge train --out {path})")
    model, _ = load_checkpoint(Path(path))
    return model, byte_tokenizer(model.cfg.vocab_size), tokenizer_meta()
