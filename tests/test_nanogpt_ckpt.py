"""nanoGPT's checkpoint layout, both ways (trainer/checkpoint/nanogpt.py).

nanoGPT itself is not vendored: the few things of it these tests need are re-implemented here
from its train.py, model.py and sample.py (the checkpoint dict, configure_optimizers' parameter
groups, GPTConfig's fields and the shapes its GPT has)."""
from __future__ import annotations

import os
import pickle
from dataclasses import make_dataclass

import pytest
import torch

from trainer.model.gpt import GPT, GPTConfig
from trainer.checkpoint.nanogpt import (CheckpointError, MODEL_ARGS, check_optimizer_state, nanogpt_keys,
                                  optimizer_param_order, read_nanogpt_checkpoint)
from trainer.step import make_optimizer

ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=65, dropout=0.0)


# nanoGPT's model.py GPTConfig: exactly these fields and defaults (GPTConfig(**model_args) fails on others)
NanoGPTConfig = make_dataclass("NanoGPTConfig", [
    ("block_size", int, 1024), ("vocab_size", int, 50304), ("n_layer", int, 12), ("n_head", int, 12),
    ("n_embd", int, 768), ("dropout", float, 0.0), ("bias", bool, True)])


def nanogpt_shapes(c: NanoGPTConfig) -> dict[str, tuple[int, ...]]:
    """The state dict of nanoGPT's GPT(c) with flash attention (no attn.bias mask buffers)."""
    C, V, T = c.n_embd, c.vocab_size, c.block_size
    out = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        layer = {"ln_1.weight": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_proj.weight": (C, C),
                 "ln_2.weight": (C,), "mlp.c_fc.weight": (4 * C, C), "mlp.c_proj.weight": (C, 4 * C)}
        if c.bias:
            layer.update({"ln_1.bias": (C,), "attn.c_attn.bias": (3 * C,), "attn.c_proj.bias": (C,),
                          "ln_2.bias": (C,), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.bias": (C,)})
        out.update({p + k: v for k, v in layer.items()})
    out["transformer.ln_f.weight"] = (C,)
    if c.bias:
        out["transformer.ln_f.bias"] = (C,)
    out["lm_head.weight"] = (V, C)
    return out


def nanogpt_optimizer(model, lr=1e-3, weight_decay=0.1):
    """nanoGPT's configure_optimizers: a name -> parameter dict, then [decay, no_decay] groups."""
    param_dict = {pn: p for pn, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in param_dict.items() if p.dim() >= 2]
    nodecay = [p for n, p in param_dict.items() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": nodecay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def ours_optimizer(model, lr=1e-3, weight_decay=0.1):
    return make_optimizer(model, learning_rate=lr, weight_decay=weight_decay, betas=(0.9, 0.95), device_type="cpu")


def train_some(model, opt, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (4, model.config.block_size), generator=g)
        model(x, torch.roll(x, -1, dims=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def new_model(seed=0, **over):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**ARGS, **over}))


def write_nanogpt_ckpt(path, model, opt, iter_num=250, best_val_loss=torch.tensor(1.4567), compiled=True, **extra):
    """ckpt.pt as nanoGPT's train.py writes it: raw_model.state_dict() (with `_orig_mod.` when the
    model was compiled), the optimizer, model_args, iter_num, best_val_loss (a 0-d tensor from
    estimate_loss) and its config dict."""
    sd = model.state_dict()
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    ck = {"model": sd, "optimizer": opt.state_dict() if opt is not None else None,
          "model_args": dict(ARGS), "iter_num": iter_num, "best_val_loss": best_val_loss,
          "config": {"dataset": "shakespeare_char", "learning_rate": 1e-3, "batch_size": 64,
                     "dtype": "bfloat16", "init_from": "scratch", "compile": True}}
    ck.update(extra)
    torch.save(ck, path)
    return path


def test_optimizer_groups_are_nanogpts_in_the_same_order():
    model = new_model()
    ours, theirs = ours_optimizer(model), nanogpt_optimizer(model)
    assert len(ours.param_groups) == len(theirs.param_groups) == 2
    for g_ours, g_theirs in zip(ours.param_groups, theirs.param_groups):
        assert [id(p) for p in g_ours["params"]] == [id(p) for p in g_theirs["params"]]
        assert g_ours["weight_decay"] == g_theirs["weight_decay"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert optimizer_param_order(model) == [[names[id(p)] for p in g["params"]] for g in ours.param_groups]
    assert optimizer_param_order(model)[0][0] == "transformer.wte.weight"  # tied lm_head appears once


def test_nanogpt_optimizer_state_continues_in_ours(tmp_path):
    """A nanoGPT run's AdamW state, loaded into our optimizer on a copy of its model, gives the
    same next steps as nanoGPT's optimizer would."""
    a = new_model()
    opt_a = nanogpt_optimizer(a)
    train_some(a, opt_a, steps=3)
    path = write_nanogpt_ckpt(tmp_path / "ckpt.pt", a, opt_a)
    ck = read_nanogpt_checkpoint(path)
    b = GPT(GPTConfig(**ck.model_args))
    b.load_state_dict(ck.model)
    opt_b = ours_optimizer(b)
    opt_b.load_state_dict(ck.optimizer)
    train_some(a, opt_a, steps=2, seed=7)
    train_some(b, opt_b, steps=2, seed=7)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0, msg=n)


def test_an_optimizer_state_in_another_order_is_refused(tmp_path):
    model = new_model()
    named = [p for p in model.parameters()]
    decay = [p for p in named if p.dim() >= 2]
    nodecay = [p for p in named if p.dim() < 2]
    swapped = torch.optim.AdamW([{"params": decay[::-1]}, {"params": nodecay}], lr=1e-3)
    train_some(model, swapped, steps=1)
    with pytest.raises(CheckpointError, match="the parameter order differs"):
        check_optimizer_state(swapped.state_dict(), model, "x")
    one_group = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError, match="1 parameter groups, nanoGPT's AdamW has 2"):
        check_optimizer_state(one_group.state_dict(), model, "x")
    path = write_nanogpt_ckpt(tmp_path / "ckpt.pt", model, swapped)
    with pytest.raises(CheckpointError, match="parameter order differs"):
        read_nanogpt_checkpoint(path)


def test_reads_nanogpt_train_py_layout(tmp_path):
    model = new_model()
    opt = nanogpt_optimizer(model)
    train_some(model, opt, steps=1)
    ck = read_nanogpt_checkpoint(write_nanogpt_ckpt(tmp_path / "ckpt.pt", model, opt))
    assert ck.layout == "nanogpt" and ck.model_args == ARGS
    assert ck.iter_num == 250 and isinstance(ck.best_val_loss, float) and abs(ck.best_val_loss - 1.4567) < 1e-6
    assert ck.config["dataset"] == "shakespeare_char"
    assert not any(k.startswith("_orig_mod.") for k in ck.model)
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model[k], v), k
    assert any(s.startswith("data position") for s in ck.not_restored)
    assert any(s.startswith("RNG state") for s in ck.not_restored)
    assert not any("optimizer" in s for s in ck.not_restored)


def test_what_cannot_be_restored_depends_on_the_file(tmp_path):
    model = new_model()
    path = write_nanogpt_ckpt(tmp_path / "ckpt.pt", model, None, compiled=False)
    ck = read_nanogpt_checkpoint(path)
    assert ck.optimizer is None and any("optimizer state" in s for s in ck.not_restored)
    cfg = {"dataset": "x", "dtype": "float16"}
    ck = read_nanogpt_checkpoint(write_nanogpt_ckpt(tmp_path / "fp16.pt", model, None, config=cfg))
    assert any("GradScaler" in s for s in ck.not_restored)


def test_an_autofit_checkpoint_is_readable_by_nanogpts_sample_py(tmp_path):
    """nanogpt_keys added to autofit's checkpoint: what sample.py reads (model_args into
    GPTConfig, the `_orig_mod.`-stripped model into GPT(GPTConfig) strictly, config['dataset']),
    from a file loaded with weights_only=True as torch >= 2.6 does by default."""
    model = new_model(bias=False, dropout=0.1)
    opt = ours_optimizer(model)
    train_some(model, opt, steps=1)
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    from trainer.config.train_config import load_config
    cfg = load_config(preset="tiny", overrides=["n_layer=2", "n_head=2", "n_embd=32", "block_size=16",
                                                "vocab_size=65", "bias=false", "dropout=0.1",
                                                "dataset=shakespeare_char"])
    autofit_state = {"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "iter_num": 9,
                     "sampler": {"seed": 1}, "eval_sampler": {"seed": 1}, "rng_cpu": torch.get_rng_state(),
                     "micro_batches": [4]}
    ck = {**autofit_state, **nanogpt_keys(compiled, opt, cfg, 9, 2.5, cfg.model_dump(mode="json"))}
    path = tmp_path / "ckpt.pt"
    torch.save(ck, path)

    loaded = torch.load(path, map_location="cpu", weights_only=True)  # sample.py: torch.load(ckpt_path)
    conf = NanoGPTConfig(**loaded["model_args"])  # a key nanoGPT's GPTConfig lacks would raise here
    assert (conf.n_layer, conf.n_embd, conf.vocab_size, conf.bias, conf.dropout) == (2, 32, 65, False, 0.1)
    state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in loaded["model"].items()}
    want = nanogpt_shapes(conf)
    assert set(state) == set(want)  # strict load_state_dict: no missing, no unexpected keys
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    assert os.path.join("data", loaded["config"]["dataset"], "meta.pkl") == "data/shakespeare_char/meta.pkl"
    for key in ("optimizer", "iter_num", "best_val_loss"):  # what train.py's resume reads
        assert key in loaded
    assert set(loaded["model_args"]) == set(MODEL_ARGS)

    back = read_nanogpt_checkpoint(path)
    assert back.layout == "autofit" and back.iter_num == 9 and back.best_val_loss == 2.5
    assert back.not_restored == []
    opt2 = ours_optimizer(GPT(GPTConfig(**back.model_args)))
    opt2.load_state_dict(back.optimizer)


def test_nanogpt_keys_needs_a_dataset_and_all_model_args():
    model = new_model()
    with pytest.raises(CheckpointError, match="must be a dict with 'dataset'"):
        nanogpt_keys(model, None, ARGS, 0, 1.0, {"learning_rate": 1e-3})
    with pytest.raises(CheckpointError, match="model args lack dropout"):
        nanogpt_keys(model, None, {k: v for k, v in ARGS.items() if k != "dropout"}, 0, 1.0, {"dataset": "x"})


def test_a_trained_autofit_checkpoint_reads_through_its_config(tmp_path):
    """The checkpoint trainer/loop.py writes today (no model_args yet): the model args come from
    its TrainConfig dict."""
    from trainer.config.train_config import load_config
    from trainer.loop import RunOptions, train
    cfg = load_config(preset="tiny", overrides=[
        "n_layer=1", "n_head=2", "n_embd=16", "block_size=16", "batch_size=2", "gradient_accumulation_steps=1",
        "eval_iters=1", "eval_interval=100", "max_iters=1", "compile=false", "dtype=float32",
        "device=cpu", f"out_dir={tmp_path}"])
    train(cfg, RunOptions(device=torch.device("cpu"), progress=False))
    ck = read_nanogpt_checkpoint(tmp_path / "ckpt.pt")
    assert ck.layout == "autofit" and ck.model_args["vocab_size"] == 256 and ck.model_args["n_embd"] == 16
    assert ck.iter_num == 1 and ck.config["dataset"] == "embedded"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("content, match", [
    (None, "no checkpoint at"),
    (b"not a torch file", "is not a readable checkpoint with weights_only=True"),
    ([1, 2, 3], "holds a list, not a checkpoint dict"),
    ({"state_dict": {}, "epoch": 3}, "is neither an autofit checkpoint nor a nanoGPT one"),
    ({"model": {}, "model_args": {"n_layer": 2}}, "model args lack n_head"),
    ({"model": {}, "model_args": dict(ARGS, n_head=3)}, "do not describe a GPT"),
    ({"model": {"transformer.wte.weight": torch.zeros(65, 32)}, "model_args": ARGS},
     "the model state lacks transformer.wpe.weight"),
])
def test_bad_files_are_one_line(tmp_path, content, match):
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as e:
        read_nanogpt_checkpoint(path)
    assert "\n" not in str(e.value)


def test_code_in_a_checkpoint_never_runs(tmp_path):
    path = tmp_path / "ckpt.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil(), "model_args": ARGS}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_nanogpt_checkpoint(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    model = new_model()
    sd = model.state_dict()
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 32)
    torch.save({"model": sd, "model_args": ARGS}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"transformer.h.1.mlp.c_fc.weight has shape \(64, 32\), "
                                              r"model_args \(n_layer=2.*\) give \(128, 32\)"):
        read_nanogpt_checkpoint(tmp_path / "ckpt.pt")


def test_a_mac_runs_device_is_dropped_not_refused(tmp_path):
    """nanoGPT's README has Mac users pass --device=mps, so their ckpt.pt says device='mps': the
    resume was refused as an invalid config before --device or --set could apply."""
    from trainer.checkpoint.nanogpt import train_config_of
    model = new_model()
    cfg = {"dataset": "x", "device": "mps", "dtype": "float32", "compile": False}
    saved, dropped = train_config_of(read_nanogpt_checkpoint(write_nanogpt_ckpt(tmp_path / "m.pt", model, None,
                                                                                config=cfg)))
    assert saved.device == "auto" and "device='mps'" in dropped
    cfg["device"] = "cuda:1"  # a device autofit trains on is kept
    saved, dropped = train_config_of(read_nanogpt_checkpoint(write_nanogpt_ckpt(tmp_path / "c.pt", model, None,
                                                                                config=cfg)))
    assert saved.device == "cuda:1" and not any(d.startswith("device") for d in dropped)
