"""Parity with transformers' LlamaForCausalLM on the same weights (sidecar silent, window covering the
whole sequence): fp32 logits within PARITY_ATOL over a 64-token prompt and 32 identical greedy tokens.
Fast: tiny random configs built in-process. Slow: the real SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import requires_torch

pytestmark = [requires_torch, pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                                 reason="transformers not installed (dev extra)")]
PARITY_ATOL = 1e-4


def _greedy_ours(model, ids, n):
    import torch

    from cortex_edge.model.lm import TorchStream

    s = TorchStream(model)
    with torch.no_grad():
        logits = s.feed(torch.tensor([ids]))[0]
        out = []
        nxt = int(logits[-1].argmax())
        for _ in range(n):
            out.append(nxt)
            nxt = int(s.feed(torch.tensor([[nxt]]))[0, -1].argmax())
    return logits, out


def _greedy_hf(hf, ids, n):
    import torch

    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
        seq = list(ids)
        out = []
        for _ in range(n):
            nxt = int(hf(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return logits, out


@pytest.mark.parametrize("kv,tied,theta,bias", [(4, True, 10000.0, False), (2, False, 500000.0, False),
                                                 (1, True, 100000.0, False), (2, True, 10000.0, True)])
def test_tiny_random_llama_parity(tmp_path, kv, tied, theta, bias):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cortex_edge.export.builtin import byte_tokenizer
    from cortex_edge.export.loaders import load_hf_folder

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv, rope_theta=theta, tie_word_embeddings=tied,
                      attention_bias=bias, max_position_embeddings=512, rms_norm_eps=1e-5)
    hf = LlamaForCausalLM(cfg).eval()
    if bias:  # HF initialises biases to zero: make them matter
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    byte_tokenizer(264).save(str(tmp_path / "tokenizer.json"))
    model, _, _ = load_hf_folder(tmp_path, window=128)
    assert model.cfg.tie_embeddings == tied and model.cfg.attn_bias == bias and model.cfg.rope_theta == theta
    ids = np.random.default_rng(1).integers(3, 264, 64).tolist()
    ours, our_tokens = _greedy_ours(model, ids, 32)
    ref, ref_tokens = _greedy_hf(hf, ids, 32)
    assert float((ours - ref).abs().max()) <= PARITY_ATOL
    assert our_tokens == ref_tokens


def _tiny_hf(tmp_path, arch: str = "llama", dtype=None, **kw):
    """A tiny random transformers model saved in-process; every bias randomised so that it matters.
    dtype: save in that dtype (the returned reference is the saved weights, in fp32)."""
    import torch
    import transformers

    from cortex_edge.export.builtin import byte_tokenizer

    torch.manual_seed(0)
    base = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                          "mistral": ("MistralConfig", "MistralForCausalLM")}[arch]
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**base, **kw})).eval()
    with torch.no_grad():
        for name, prm in hf.named_parameters():
            if name.endswith("bias"):
                prm.normal_(0, 0.1)
    out = tmp_path / "hf"
    if dtype is not None:
        hf = hf.to(getattr(torch, dtype))
    hf.save_pretrained(out)
    byte_tokenizer(264).save(str(out / "tokenizer.json"))
    return hf.float(), out


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 500000.0}
FEATURES = {  # every supported field, each on its own
    "attention_bias (q/k/v/o)": ("llama", dict(attention_bias=True)),
    "mlp_bias": ("llama", dict(mlp_bias=True)),
    "gelu": ("llama", dict(hidden_act="gelu")),
    "gelu_pytorch_tanh": ("llama", dict(hidden_act="gelu_pytorch_tanh")),
    "llama3 rope": ("llama", dict(rope_parameters=LLAMA3)),
    "linear rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "explicit head_dim": ("llama", dict(head_dim=32)),
    "MHA untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "GQA 4:1": ("llama", dict(num_key_value_heads=1)),
    "qwen2": ("qwen2", dict()),
    "bf16 weights": ("llama", dict(dtype="bfloat16")),
    "fp16 weights": ("qwen2", dict(dtype="float16")),
    "mistral, window wider than the bundle's": ("mistral", dict(sliding_window=4096)),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_every_supported_feature_matches_transformers(tmp_path, feature):
    from cortex_edge.export.loaders import load_hf_folder

    arch, kw = FEATURES[feature]
    hf, path = _tiny_hf(tmp_path, arch, **kw)
    model, _, _ = load_hf_folder(path, window=128)
    ids = np.random.default_rng(1).integers(3, 264, 64).tolist()
    ours, our_tokens = _greedy_ours(model, ids, 32)
    ref, ref_tokens = _greedy_hf(hf, ids, 32)
    assert float((ours - ref).abs().max()) <= PARITY_ATOL
    assert our_tokens == ref_tokens


COMPOSITES = {  # between them, every feature of FEATURES, through a bundle
    "biases, tanh GELU, llama3 RoPE, untied, GQA 4:1": ("llama", dict(
        attention_bias=True, mlp_bias=True, hidden_act="gelu_pytorch_tanh", rope_parameters=LLAMA3,
        tie_word_embeddings=False, num_key_value_heads=1)),
    "exact GELU, linear RoPE, explicit head_dim, MHA, MLP bias": ("llama", dict(
        hidden_act="gelu", head_dim=32, num_key_value_heads=4, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "qwen2 in bf16": ("qwen2", dict(dtype="bfloat16")),
    "mistral, wide window, fp16": ("mistral", dict(sliding_window=4096, dtype="float16")),
}


@pytest.mark.parametrize("composite", COMPOSITES)
def test_every_feature_through_the_exported_bundle(tmp_path, composite):
    """transformers against the exported fp32 bundle (onnxruntime + the NumPy runtime), logits over 64
    tokens and 32 greedy tokens."""
    import torch

    from cortex_edge.export.bundle_writer import write_bundle
    from cortex_edge.export.loaders import load_hf_folder
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    arch, kw = COMPOSITES[composite]
    hf, path = _tiny_hf(tmp_path, arch, **kw)
    model, tok, meta = load_hf_folder(path, window=128)
    out = tmp_path / "bundle"
    write_bundle(model, tok, meta, out, weights="fp32", state="fp32", source=str(path), quiet=True)
    eng = Engine(load_bundle(out), threads=1)
    ids = np.random.default_rng(2).integers(3, 264, 64).tolist()
    st_ = eng.new_state()
    ours = eng.feed(st_, ids, all_logits=True)
    our_tokens = []
    nxt = int(ours[-1].argmax())
    for _ in range(32):
        our_tokens.append(nxt)
        nxt = int(eng.feed(st_, [nxt]).argmax())
    ref, ref_tokens = _greedy_hf(hf, ids, 32)
    assert float(np.abs(ours - ref.numpy()).max()) <= PARITY_ATOL
    assert our_tokens == ref_tokens
    del torch


REFUSED = {  # changes the maths and is not implemented: refused by name
    "sliding window narrower than the bundle's": ("mistral", dict(sliding_window=32), "sliding_window"),
    "yarn rope": ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                 "original_max_position_embeddings": 64}), "yarn"),
    "relu activation": ("llama", dict(hidden_act="relu"), "hidden_act"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_is_not_implemented_is_refused_by_name(tmp_path, case):
    from cortex_edge.export.loaders import load_hf_folder
    from cortex_edge.runtime.errors import CortexError

    arch, kw, word = REFUSED[case]
    _, path = _tiny_hf(tmp_path, arch, **kw)
    with pytest.raises(CortexError, match=word):
        load_hf_folder(path, window=128)


def test_unknown_fields_and_tensors_are_refused_by_name(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    from cortex_edge.export.loaders import load_hf_folder
    from cortex_edge.runtime.errors import CortexError

    _, path = _tiny_hf(tmp_path)
    c = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**c, "final_logit_softcapping": 30.0}))
    with pytest.raises(CortexError, match="final_logit_softcapping"):
        load_hf_folder(path, window=128)
    (path / "config.json").write_text(json.dumps(c))
    f = next(path.glob("*.safetensors"))
    t = load_file(str(f))
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(t, str(f))
    with pytest.raises(CortexError, match="q_norm"):
        load_hf_folder(path, window=128)


@pytest.mark.slow
def test_smollm2_gguf_parity():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cortex_edge.export.loaders import load_gguf, smollm2_path
    from cortex_edge.runtime.text import ChatFormat

    try:
        p = smollm2_path()
    except Exception as e:
        pytest.skip(str(e))
    model, tok, meta = load_gguf(p)
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    for s in ["Hello world 12345 héllo  spaces\n\ttab", "def f(x):\n    return x**2  # ok", "<|im_start|>user"]:
        assert tok.encode(s, add_special_tokens=False).ids == htok.encode(s, add_special_tokens=False)
    text = "".join(t for t, _ in ChatFormat(meta["chat_template"]).first_turn("Write a haiku about the sea and the number 42."))
    ids = tok.encode(text, add_special_tokens=False).ids
    hids = htok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea and the number 42."}],
                                    add_generation_prompt=True, tokenize=True)
    hids = hids["input_ids"] if hasattr(hids, "keys") else hids
    assert ids == list(hids)
    ids = (ids * 3)[:64]
    ours, our_tokens = _greedy_ours(model, ids, 32)
    ref, ref_tokens = _greedy_hf(hf, ids, 32)
    assert float((ours - ref).abs().max()) <= 1e-3  # 30 layers, vocab 49152: a looser named bound
    assert our_tokens == ref_tokens


def test_chat_takes_a_checkpoint_folder_and_exports_it_once(tmp_path):
    """`cortex-edge chat FOLDER`: exported into the cache on first use (checked against transformers, recorded
    in the manifest), reused after."""
    import json
    import subprocess
    import sys

    from cortex_edge import contract

    _, path = _tiny_hf(tmp_path, "llama", attention_bias=True, hidden_act="gelu")
    env = {**__import__("os").environ, "CORTEX_EDGE_HOME": str(tmp_path / "home")}
    run = lambda: subprocess.run([sys.executable, "-m", "cortex_edge", "chat", str(path), "--prompt", "hi",  # noqa: E731
                                  "--max-new-tokens", "3", "--no-session"], capture_output=True, text=True, env=env,
                                 timeout=600)
    r = run()
    assert r.returncode == 0, r.stderr
    assert "first run: exporting" in r.stderr
    (bundle,) = [p for p in (tmp_path / "home" / "bundles").iterdir() if p.is_dir()]
    ref = json.loads((bundle / contract.MANIFEST).read_text())["validation"]["reference"]
    assert ref["library"].startswith("transformers") and ref["max_abs_logit_diff"] <= 1e-3
    r = run()
    assert r.returncode == 0 and "first run" not in r.stderr, r.stderr


def test_an_untied_head_under_a_tying_config_is_used_as_transformers_uses_it(tmp_path):
    """tie_word_embeddings true but a different lm_head.weight stored: transformers uses both (and warns)."""
    import torch
    from safetensors.torch import load_file, save_file

    from cortex_edge.export.loaders import load_hf_folder

    hf, path = _tiny_hf(tmp_path, "llama", tie_word_embeddings=True)
    f = next(path.glob("*.safetensors"))
    t = load_file(str(f))
    t["lm_head.weight"] = torch.randn_like(t["model.embed_tokens.weight"]) * 0.05
    save_file(t, str(f), metadata={"format": "pt"})
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model, _, _ = load_hf_folder(path, window=128)
    ids = np.random.default_rng(3).integers(3, 264, 32).tolist()
    ours, _ = _greedy_ours(model, ids, 1)
    ref, _ = _greedy_hf(ref_model, ids, 1)
    assert float((ours - ref).abs().max()) <= PARITY_ATOL


def _write_gguf(hf, path, rope_freqs=None):
    """The transformers model as a llama.cpp-style GGUF (q/k rows permuted, F32 tensors, a byte-level vocab)."""
    from gguf import GGUFWriter

    from cortex_edge.export.builtin import SPECIALS, bytes_to_unicode

    c = hf.config
    H, KV = c.num_attention_heads, c.num_key_value_heads
    hd = c.hidden_size // H

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    tokens = list(SPECIALS) + [ch for _, ch in sorted(bytes_to_unicode().items())]
    tokens += [f"<unused{i}>" for i in range(c.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([])
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            t = sd[f"model.layers.{i}.{ours}.weight"]
            t = permute(t, H) if theirs == "attn_q" else permute(t, KV) if theirs == "attn_k" else t
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_llama3_gguf_with_rope_freqs_matches_transformers(tmp_path):
    """A Llama 3.x-style GGUF carries its RoPE scaling as a rope_freqs tensor (llama.cpp's convert writes the
    per-frequency divisors): read back, the model computes what transformers computes with rope_parameters."""
    from cortex_edge.config import llama3_divisors
    from cortex_edge.export.loaders import load_gguf

    rope = {**LLAMA3, "original_max_position_embeddings": 256}  # hd 16: one frequency in the blended band
    hf, _ = _tiny_hf(tmp_path, "llama", rope_parameters=rope, tie_word_embeddings=False)
    hd = hf.config.hidden_size // hf.config.num_attention_heads
    freqs = llama3_divisors(hd, rope["rope_theta"], rope["factor"], rope["low_freq_factor"],
                            rope["high_freq_factor"], rope["original_max_position_embeddings"])
    assert len(set(freqs)) > 2  # long, short and blended frequencies all present
    _write_gguf(hf, tmp_path / "m.gguf", rope_freqs=freqs)
    model, _, _ = load_gguf(tmp_path / "m.gguf", window=128)
    assert model.cfg.rope_freq_divisors == pytest.approx(freqs, rel=1e-6)
    ids = np.random.default_rng(4).integers(3, 264, 64).tolist()
    ours, our_tokens = _greedy_ours(model, ids, 16)
    ref, ref_tokens = _greedy_hf(hf, ids, 16)
    assert float((ours - ref).abs().max()) <= PARITY_ATOL
    assert our_tokens == ref_tokens
    _write_gguf(hf, tmp_path / "plain.gguf")  # the same file without rope_freqs computes something else
    plain, _, _ = load_gguf(tmp_path / "plain.gguf", window=128)
    assert float((_greedy_ours(plain, ids, 1)[0] - ref).abs().max()) > 10 * PARITY_ATOL
