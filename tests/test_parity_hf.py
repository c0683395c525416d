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
    text = ChatFormat(meta["chat_template"]).first_turn("Write a haiku about the sea and the number 42.")
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
