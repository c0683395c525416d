"""`cortex-edge train`: the task data, backpropagation through memory events, both recipes, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import requires_torch

pytestmark = requires_torch


def test_passkey_rows_hold_the_answer_and_only_training_seeds():
    from cortex_edge.model import train as tr
    from cortex_edge.runtime import niah

    for length in (200, 400):
        ids, w = tr.passkey_row(length, seed=123)
        assert len(ids) == len(w) == length
        text = bytes(i - 3 for i in ids).decode()
        key = text.split("The pass key is ")[1][:5]
        assert text.endswith(niah.QUESTION + f" {key}.")
        assert sum(w) == len(f" {key}.") and w[-1] == 1.0 and w[-len(f" {key}.") - 1] == 0.0
    with pytest.raises(ValueError, match="held-out"):
        tr.passkey_row(200, seed=niah.HELD_OUT_SEED)


def test_far_needles_end_out_of_the_attention_reach():
    from cortex_edge.model import train as tr

    far = 84
    for seed in range(30):
        ids, _ = tr.passkey_row(400, seed, far=far)
        text = bytes(i - 3 for i in ids).decode()
        needle_end = text.index(" is the pass key. ") + len(" is the pass key. ")
        question = text.index("What is the pass key?")
        assert question - needle_end >= far


def test_answer_loss_reaches_the_write_weights_across_events():
    """The gradient of a late answer flows back through the memory to an early event's write."""
    import torch

    from cortex_edge.config import tiny_config
    from cortex_edge.model import train as tr

    cfg = tiny_config()
    model = tr.new_model(cfg, "stable", seed=0)
    with torch.no_grad():
        model.cms_read.out.weight.normal_(0, 0.1)  # an untrained read is silent (W_o = 0)
    ids, w = tr.passkey_row(160, seed=5, far=cfg.sinks + cfg.window + cfg.cms.chunk)
    out = tr.forward(model, torch.tensor([ids]), torch.tensor([w]))
    out["answer"].backward()
    g = model.cms_write.levels[0].value.weight.grad
    assert g is not None and float(g.abs().max()) > 0
    assert out["stream"].events == 160 // cfg.cms.chunk


@pytest.mark.parametrize("recipe", ["stable", "naive"])
def test_a_few_steps_of_each_recipe(tmp_path, recipe):
    from cortex_edge.config import tiny_config
    from cortex_edge.model import train as tr

    tc = tr.TrainConfig(recipe=recipe, steps=4, batch=2, stages=((0.5, (112,), 0.5, 0.0), (1.0, (160,), 1.0, 1.0)), eval_every=2, warmup=1, long_steps=2, long_stages=((1.0, (224,), 1.0, 1.0),))
    out = tmp_path / "m.safetensors"
    _, hist = tr.train(tc, cfg=tiny_config(), out=out if recipe == "stable" else None)
    assert len(hist) == 6 and all(np.isfinite(h["loss"]) for h in hist)
    for key in ("grad_norm_backbone", "grad_norm_memory", "read_gate_entropy", "level_read_share",
                "memory_norm", "memory_norm_bound", "write_gate_mean"):
        assert key in hist[-1]
    assert "eval" in hist[1] and "eval" in hist[3]
    if recipe == "stable":
        assert all(n <= b for n, b in zip(hist[-1]["memory_norm"], hist[-1]["memory_norm_bound"]))
        model, meta = tr.load_checkpoint(out)
        assert meta["steps"] == 6 and model.cfg == tiny_config()


def test_polish_starts_from_the_checkpoint_and_changes_it(tmp_path):
    """The polish stage (train --polish): same weights to start with, then trained; a missing file is one line."""
    import dataclasses

    from click.testing import CliRunner

    from cortex_edge.cli import cli
    from cortex_edge.config import tiny_config
    from cortex_edge.model import train as tr
    from cortex_edge.model.lm import build

    ck = tmp_path / "a.safetensors"
    tr.save_checkpoint(build(tiny_config(), 3), ck, {"steps": 0})
    tc = dataclasses.replace(tr.polish_config(str(ck)), steps=2, batch=2, stages=((1.0, (160,), 1.0, 1.0),),
                             eval_every=1, warmup=1)
    model, hist = tr.train(tc, cfg=tiny_config())
    before = tr.load_checkpoint(ck)[0].state_dict()
    after = model.state_dict()
    assert len(hist) == 2 and any(not torch_equal(before[k], after[k]) for k in before)
    r = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "b.safetensors"), "--polish", str(tmp_path / "no.safetensors")])
    assert r.exit_code != 0 and "no such checkpoint" in r.output
    r = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "b.safetensors"), "--margin", "5"])
    assert r.exit_code == 2 and "--margin goes with --polish" in r.output and not (tmp_path / "b.safetensors").exists()
    # frozen: the named parameters keep their start, the rest of the same module still trains
    cfg = dataclasses.replace(tiny_config(), cms=dataclasses.replace(tiny_config().cms, adaptive_decay=True))
    assert tc.frozen == ("cms_write.levels.0.decay.",) and tc.margin == 0.0  # a polish leaves level 0's decay alone
    after = tr.train(tc, cfg=cfg)[0].state_dict()
    for k in ("cms_write.levels.0.decay.weight", "cms_write.levels.0.decay.bias"):
        assert torch_equal(before[k], after[k])
    for k in ("cms_write.levels.0.value.weight", "cms_write.levels.1.decay.weight"):  # (level 1's decay is learnt)
        assert not torch_equal(before[k], after[k])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_naive_writer_has_no_decay_and_hard_top_k():
    import torch

    from cortex_edge.config import tiny_config
    from cortex_edge.model import train as tr
    from cortex_edge.model.cms import empty_state

    cfg = tiny_config().cms
    w = tr.NaiveWriter(cfg, seed=0)
    mems, keys, usage = empty_state(cfg, batch=1)
    for e in range(1, 6):
        mems, keys, usage, _ = w.event_step(mems, keys, usage, torch.randn(1, cfg.event_dim), e)
    written = (mems[0].abs().sum(-1) > 0).sum().item()
    assert written <= 5  # one slot per event (top-5 % of 16 slots = 1)
    before = mems[0].clone()
    with torch.no_grad():
        for head in w.levels:
            head.gate.bias.fill_(-1e4)  # gate shut: nothing decays either
    mems, *_ = w.event_step(mems, keys, usage, torch.randn(1, cfg.event_dim), 6)
    assert torch.allclose(mems[0], before)


def test_oscillation_ratio():
    from cortex_edge.model.train import oscillation

    assert oscillation([2.0] * 100)["worst"] == 1.0
    o = oscillation([1.0, 4.0] * 100, window=10)
    assert o["median"] == 4.0 and o["worst"] == 4.0


def test_a_checkpoint_exports_and_a_wrong_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    from cortex_edge.config import tiny_config
    from cortex_edge.export.pipeline import export_model
    from cortex_edge.model import train as tr
    from cortex_edge.model.lm import build
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine
    from cortex_edge.runtime.errors import CortexError

    ck = tmp_path / "c.safetensors"
    tr.save_checkpoint(build(tiny_config(), 3), ck, {"steps": 0})
    man = export_model(str(ck), tmp_path / "b", quiet=True)
    assert man["validation"]["stream"]["top1_agreement"] > 0.9
    eng = Engine(load_bundle(tmp_path / "b"), threads=1, state_format="fp16")
    assert eng.new_state().levels[0].mem["q"].dtype == np.float16
    bad = tmp_path / "bad.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(bad))
    with pytest.raises(CortexError, match="not a cortex-edge training checkpoint"):
        export_model(str(bad), tmp_path / "b2", quiet=True)


def test_builtin_recall_is_a_trained_checkpoint_of_its_config():
    from cortex_edge.config import recall_config
    from cortex_edge.export.builtin import RECALL_CHECKPOINT
    from cortex_edge.model.train import load_checkpoint

    model, meta = load_checkpoint(RECALL_CHECKPOINT)
    assert model.cfg == recall_config()
    assert meta["train"]["recipe"] == "stable" and meta["final_eval"]["answer_exact"] > 0.5


def test_margin_cost_is_the_hinge_on_the_answer_bytes_only():
    """margin: mean over answer positions of relu(m - (right logit - best wrong logit)); rows without an
    answer (language rows) and the haystack never enter it."""
    import torch

    from cortex_edge.config import tiny_config
    from cortex_edge.model import train as tr

    model = tr.new_model(tiny_config(), "stable", seed=0).eval()
    ids, w = tr.passkey_row(160, seed=7)
    lm_row = torch.arange(160).remainder(200).add(3)[None]
    ids_t = torch.cat([torch.tensor([ids]), lm_row])
    w_t = torch.cat([torch.tensor([w]), torch.zeros(1, 160)])
    with torch.no_grad():
        out = tr.forward(model, ids_t, w_t, margin=2.0)
        logits = tr.TorchStream(model, batch=2).feed(ids_t)
    at = torch.nonzero(w_t[0, 1:] > 0).flatten()
    lg, tgt = logits[0, at], ids_t[0, at + 1]
    right = lg[torch.arange(len(at)), tgt]
    wrong = lg.clone()
    wrong[torch.arange(len(at)), tgt] = float("-inf")
    want = torch.relu(2.0 - (right - wrong.max(1).values)).mean()
    assert len(at) == 7 and torch.allclose(out["margin"], want, atol=1e-5)
    assert float(tr.forward(model, ids_t, w_t)["margin"]) == 0.0  # off by default
