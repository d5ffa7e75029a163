"""A schedule of stages (trainer/config/stages.py): batch and block size changing during training.

The probe fits the largest stage; the run switches stage at its until_iter, keeps each stage's
effective batch exact (tokens counted per optimizer step) and never runs more tokens per
micro-batch than the fitted micro-batch; a resume lands in its stage; bad stage lists are one line.
Every run is a ~35k-parameter GPT on the embedded corpus, fp32 on the CPU, a few optimizer steps.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

import trainer.redo as loop  # where the loop calls train_step
from autofit.launch import probe as probe_mod
from autofit.launch.probe import ProbeOptions, run_probe
from autofit.report.render import stage_lines
from trainer.config.pyfile import ConfigError
from trainer.config.stages import fitted_config, stage_at
from trainer.config.train_config import TrainConfig, load_config
from trainer.loop import RunOptions, train
from trainer.step import FaultInjector

CPU = torch.device("cpu")
# the largest stage (block 64, 12 sequences) is the middle one: fitting the first or the last is wrong
STAGES = ("[dict(until_iter=3, block_size=32, tokens_per_step=384), "
          "dict(until_iter=5, block_size=64, tokens_per_step=768), "
          "dict(block_size=64, tokens_per_step=512)]")
# per stage: (first step, block size, sequences per step)
EXPECTED = [(0, 32, 12), (3, 64, 12), (5, 64, 8)]
STEPS = 7


def make_cfg(out_dir, stages: str = STAGES, **over) -> TrainConfig:
    base = dict(n_layer=2, n_embd=32, n_head=2, block_size=64, batch_size=4, gradient_accumulation_steps=2,
                eval_iters=2, eval_interval=0, log_interval=1, dataset="embedded", out_dir=str(out_dir), max_iters=STEPS,
                warmup_iters=2, lr_decay_iters=STEPS, learning_rate=1e-3, min_lr=1e-4, dtype="float32",
                compile=False, device="cpu")
    base.update(over)
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in base.items()] + [f"stages={stages}"])


def opts(**kw) -> RunOptions:
    return RunOptions(device=CPU, progress=False, **kw)


def records(out_dir, kind: str) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


class StepSpy:
    """Wraps trainer.redo.train_step: the sequences, their length and the micro-batches of every
    optimizer step that completed."""

    def __init__(self, monkeypatch):
        self.steps: list[tuple[int, int, list[int]]] = []
        real = loop.train_step

        def spy(model, optimizer, x, y, micro_batches, **kw):
            res = real(model, optimizer, x, y, micro_batches, **kw)
            self.steps.append((x.shape[0], x.shape[1], list(micro_batches)))
            return res
        monkeypatch.setattr(loop, "train_step", spy)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("stages, message", [
    ("[]", "stages must be a non-empty list of tables"),
    ("5", "stages must be a non-empty list"),
    ("[dict(block_size=64, tokens_per_step=100)]", "stages[0].tokens_per_step (100) must be a whole number of "
                                                   "sequences of its block_size (64): e.g. 64 or 128"),
    ("[dict(until_iter=5, block_size=64, tokens_per_step=128)]", "stages[0] is the last stage and runs until "
                                                                 "training ends: drop its until_iter (5)"),
    ("[dict(block_size=32, tokens_per_step=64), dict(block_size=64, tokens_per_step=64)]",
     "stages[0] needs until_iter"),
    ("[dict(until_iter=5, block_size=32, tokens_per_step=64), dict(until_iter=5, block_size=64, tokens_per_step=64),"
     " dict(block_size=64, tokens_per_step=64)]", "stages[1].until_iter (5) must be greater than stages[0].until_iter (5)"),
    ("[dict(block_size=64, tokens=64)]", "stages[0]: unknown key 'tokens'"),
    ("[dict(tokens_per_step=64)]", "stages[0] has no block_size"),
    ("[dict(block_size=64, tokens_per_step=0)]", "stages[0].tokens_per_step must be a positive integer, not 0"),
    ("[dict(block_size=64, tokens_per_step=True)]", "stages[0].tokens_per_step must be a positive integer, not True"),
    ("[dict(block_size=32, tokens_per_step=64)]", "the largest stage block_size (32) must equal block_size (64)"),
    ("[dict(until_iter=2, block_size=128, tokens_per_step=128), dict(block_size=64, tokens_per_step=64)]",
     "the largest stage block_size (128) must equal block_size (64)"),
    ("[[64, 128]]", "stages must be a non-empty list of tables {until_iter, block_size, tokens_per_step}"),
])
def test_bad_stage_lists_are_one_line(tmp_path, stages, message):
    with pytest.raises(ConfigError) as e:
        make_cfg(tmp_path, stages=stages)
    msg = str(e.value)
    assert "\n" not in msg and message in msg, msg


def test_stages_read_alike_from_toml_py_and_set(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("block_size = 64\nstages = [\n  {until_iter = 3, block_size = 32, tokens_per_step = 384},\n"
                    "  {until_iter = 5, block_size = 64, tokens_per_step = 768},\n"
                    "  {block_size = 64, tokens_per_step = 512},\n]\n")
    py = tmp_path / "c.py"
    py.write_text(f"block_size = 64\nstages = {STAGES}\n")
    arrays = tmp_path / "arrays.toml"  # TOML's array of tables
    arrays.write_text("block_size = 64\n" + "".join(
        f"[[stages]]\n{'until_iter = %d' % u if u else ''}\nblock_size = {t}\ntokens_per_step = {n}\n"
        for u, t, n in [(3, 32, 384), (5, 64, 768), (None, 64, 512)]))
    got = [load_config(config_file=f, overrides=["dataset=embedded"]).stages for f in (toml, py, arrays)]
    got.append(load_config(overrides=["dataset=embedded", "block_size=64", f"stages={STAGES}"]).stages)
    assert all(g == got[0] for g in got)
    assert [(s.until_iter, s.block_size, s.effective_batch) for s in got[0]] == [(3, 32, 12), (5, 64, 12), (None, 64, 8)]
    toml.write_text("block_size = 64\nstages = [[64, 128]]\n")
    with pytest.raises(ConfigError, match=r"stages\[0\] must be a table \{until_iter, block_size, tokens_per_step\}, "
                                          r"not list"):
        load_config(config_file=toml)
    # a .py config refuses every other list, and a stage written as something else than a dict
    bad = tmp_path / "bad.py"
    bad.write_text("stages = [dict(block_size=64, tokens_per_step=64), f(1)]\n")
    with pytest.raises(ConfigError, match=r"bad\.py:1: refused: function call: expected a dict"):
        load_config(config_file=bad)


def test_stage_at_switches_at_until_iter():
    stages = make_cfg("x").stages
    assert [stage_at(stages, it) for it in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]
    from trainer.config.stages import batch_words
    assert batch_words(make_cfg("x")).endswith("steps 0-2: 12 x 32 = 384 tokens per step; steps 3-4: 12 x 64 = 768 "
                                               "tokens per step; steps 5 on: 8 x 64 = 512 tokens per step")


# ---------------------------------------------------------------- probe


def test_probe_fits_the_largest_stage_and_the_plan_says_so(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    fitted = fitted_config(cfg)
    assert (fitted.stages, fitted.block_size, fitted.effective_batch) == (None, 64, 12)
    # the estimated probe (a simulated card) plans the largest stage's batch and block size
    res, _, _ = run_probe(cfg, ProbeOptions(gpu="rtx4070-12gb"))
    assert (res.plan.block_size, res.plan.effective_batch) == (64, 12)
    lines = stage_lines(cfg, res.plan)
    assert "the plan fits stages[1]" in lines[0] and lines[2].endswith("(fitted)")
    from rich.console import Console
    from autofit.report.render import render_probe
    console = Console(record=True, width=300)
    render_probe(res, console, cfg=cfg)
    text = console.export_text()
    # the config as written is its fitted stage: batch_size 4 x 3 = its 12 sequences
    assert "your config as written (4 x 3, " in text and "stages[1] steps 3 to 4: 12 x 64" in text
    # the measured probe on an opened device sees the same config
    seen = []
    result = types.SimpleNamespace(notes=None)  # probe_on adds the space's notes to what the probe returns
    monkeypatch.setattr(probe_mod, "probe_measured", lambda c, *a, **k: seen.append(c) or result)
    said = []
    from autofit.planning.budget import device_budget
    from autofit.devices.opener import open_device
    device = open_device("cpu", budget_bytes=2**30)
    assert probe_mod.probe_on(cfg, device, device_budget(device, 0.1), ProbeOptions(device="cpu"), said.append) is result
    assert (seen[0].block_size, seen[0].effective_batch, seen[0].stages) == (64, 12, None)
    assert any("fitting stages[1] (12 x 64 = 768 tokens per step)" in s for s in said)


def test_the_fitted_stage_is_the_largest_block_then_the_largest_batch(tmp_path):
    cfg = make_cfg(tmp_path, stages="[dict(until_iter=2, block_size=64, tokens_per_step=256), "
                                    "dict(until_iter=4, block_size=32, tokens_per_step=2048), "
                                    "dict(block_size=64, tokens_per_step=640)]")
    f = fitted_config(cfg)
    assert (f.block_size, f.effective_batch) == (64, 10)
    assert f.batch_size * f.gradient_accumulation_steps == 10 and f.batch_size <= cfg.batch_size


# ---------------------------------------------------------------- run


def test_each_stage_keeps_its_effective_batch_exactly(tmp_path, monkeypatch):
    spy = StepSpy(monkeypatch)
    res = train(make_cfg(tmp_path), opts(micro_batch=4))  # 4 x 64 = 256 tokens per micro-batch, fitted
    assert res.steps == STEPS and len(spy.steps) == STEPS
    for it, (rows, T, mbs) in enumerate(spy.steps):
        first, block, seqs = next(e for e in reversed(EXPECTED) if it >= e[0])
        assert (rows, T, sum(mbs)) == (seqs, block, seqs), it  # tokens per step = the stage's, exactly
        assert max(mbs) * T <= 4 * 64, it  # never more tokens per micro-batch than fitted
    # the 32-token stage runs twice the sequences per micro-batch (the same tokens); grad accumulation per stage
    assert [s[2] for s in spy.steps] == [[6, 6]] * 3 + [[4, 4, 4]] * 2 + [[4, 4]] * 2
    assert res.tokens == 3 * 384 + 2 * 768 + 2 * 512
    train_recs = records(tmp_path, "train")
    assert [(r["stage"], r["block_size"], r["effective_batch"]) for r in train_recs] == \
        [(0, 32, 12)] * 3 + [(1, 64, 12)] * 2 + [(2, 64, 8)] * 2
    assert [(e["step"], e["stage"]) for e in records(tmp_path, "event") if e["event"] == "stage"] == [(0, 0), (3, 1), (5, 2)]


@pytest.mark.parametrize("stop", [2, 3, 4])
def test_resume_mid_schedule_lands_in_its_stage(tmp_path, stop):
    """Stopped inside the first stage (whose sequences, 32, are shorter than the model's, 64), at
    the boundary (its sampler saved at 32 tokens, the next step in the 64-token stage), or inside the
    second stage."""
    whole = train(make_cfg(tmp_path / "whole"), opts(micro_batch=4))
    first = train(make_cfg(tmp_path / "split"), opts(micro_batch=4, max_steps=stop))
    assert first.steps == stop
    rest = train(make_cfg(tmp_path / "split"), opts(micro_batch=4, resume=True))
    assert rest.steps == STEPS
    assert first.losses + rest.losses == pytest.approx(whole.losses, rel=1e-6, abs=0)
    stages = [(r["step"], r["stage"], r["block_size"]) for r in records(tmp_path / "split", "train")]
    assert stages == [(i, stage_at(make_cfg("x").stages, i), 32 if i < 3 else 64) for i in range(STEPS)]


def test_an_oom_in_a_short_stage_lowers_the_tokens_of_later_stages(tmp_path, monkeypatch):
    spy = StepSpy(monkeypatch)
    seen = []
    train(make_cfg(tmp_path), opts(micro_batch=4, fault=FaultInjector(1), on_event=seen.append))
    shrink = next(e for e in seen if e["event"] == "oom_shrink")
    # no trials: 6 x 32 = 192 tokens, 3 sequences of the plan's 64, halved in the plan's units to 1:
    # 2 x 32 = 64 tokens, one 64-token sequence per micro-batch from then on
    assert (shrink["old_micro_batch"], shrink["new_micro_batch"], shrink["stage"]) == (6, 2, 0)
    assert shrink["micro_batch_at_block_size"] == 1  # the profile's lesson, in the plan's sequences
    import autofit.launch.run as launch
    recorded = []
    monkeypatch.setattr(launch, "record_event", lambda *a, **k: recorded.append(k["safe_micro_batch"]))
    real = {k: v for k, v in shrink.items() if k != "injected"}  # an injected one is never a lesson
    launch._profile_recorder("cpu-64mb", "abc", log=lambda s: None)(real)
    assert recorded == [1]  # not 2: two 64-token sequences would exceed the 64 tokens that fitted
    assert [s[2] for s in spy.steps[1:3]] == [[2] * 6] * 2
    assert [s[2] for s in spy.steps[3:]] == [[1] * 12] * 2 + [[1] * 8] * 2


def test_a_short_stage_oom_shrinks_to_the_next_measured_fit_in_the_plans_units(tmp_path, monkeypatch):
    """The probe's fit sizes count sequences of block_size (64), a 16-token stage's micro-batch
    its own: an OOM there drops one measured fit step in tokens (6 x 64 -> 4 x 64), not a factor
    of 4 (24 x 16 read as 24 sequences of 64, shrunk to the plan's own 6: 96 tokens). Found by r2
    (session 14)."""
    from trainer.recovery import shrink_policy
    stages = "[dict(until_iter=3, block_size=16, tokens_per_step=768), dict(block_size=64, tokens_per_step=768)]"
    spy = StepSpy(monkeypatch)
    seen = []
    # the plan: micro-batch 6 at block 64 (384 tokens); trials showed 1, 2, 3, 4 and 6 fit at block 64
    train(make_cfg(tmp_path, stages=stages, max_iters=4, lr_decay_iters=4),
          opts(micro_batch=6, shrink=shrink_policy([1, 2, 3, 4, 6]), fault=FaultInjector(1), on_event=seen.append))
    shrink = next(e for e in seen if e["event"] == "oom_shrink")
    assert shrink["old_micro_batch"] == 24  # 24 x 16 = 384 tokens, the fitted micro-batch's
    # the next size the trials showed to fit is 4 x 64 = 256 tokens = 16 sequences of 16
    assert (shrink["new_micro_batch"], shrink["micro_batch_at_block_size"]) == (16, 4), shrink
    assert shrink["stage_max_tokens"] == 256
    assert [s[2] for s in spy.steps] == [[24, 24]] + [[16, 16, 16]] * 2 + [[4, 4, 4]]  # the 64-token stage: 4, measured


def test_every_stages_batch_must_divide_among_the_ranks(tmp_path):
    from trainer.errors import TrainError
    from trainer.recovery import StagedRun
    cfg = make_cfg(tmp_path)
    assert StagedRun(cfg, 4, 4).micro_batches(0) == [3]  # 12 / 4 ranks, at most 8 sequences of 32
    with pytest.raises(TrainError, match=r"^stages\[2\] \(8 x 64 = 512 tokens per step\): 8 sequences do not divide "
                                         r"among 3 ranks; make its tokens_per_step a multiple of 3 x 64 = 192$"):
        StagedRun(cfg, 3, 4)  # stages 0 and 1 (12 sequences) divide, the last (8) does not


def test_a_resume_keeps_the_token_limit_an_oom_lowered(tmp_path, monkeypatch):
    """An OOM shrink in the 32-token stage (6 -> 2 sequences: 64 tokens) is the limit after
    `autofit run --resume` too: the checkpoint keeps it (stage_max_tokens), and the resumed run's
    micro-batch at block_size is 1 (not the stage's 2, read as 2 x 64 tokens)."""
    from autofit.launch.probe import ProbeOptions
    from autofit.launch.resume import prepare_resume
    first = train(make_cfg(tmp_path), opts(micro_batch=4, max_steps=2, fault=FaultInjector(1)))
    assert first.micro_batches == [2] * 6
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["stage_max_tokens"] == 64
    launch = prepare_resume(str(tmp_path), {}, probe_opts=ProbeOptions(), max_steps=None, progress=False,
                            log=lambda s: None)
    assert launch.opts.micro_batch == 1
    spy = StepSpy(monkeypatch)
    rest = train(launch.cfg, launch.opts)
    assert rest.steps == STEPS
    assert [s[2] for s in spy.steps] == [[2] * 6] + [[1] * 12] * 2 + [[1] * 8] * 2


def test_a_measured_probe_on_the_budgeted_cpu_fits_the_largest_stage(tmp_path):
    """Real trials (the budgeted CPU device): they run the largest stage's 64-token sequences, and the
    plan's batch is its 12 sequences."""
    cfg = make_cfg(tmp_path)
    said = []
    res, _, _ = run_probe(cfg, ProbeOptions(device="cpu", budget_bytes=256 * 2**20, checkpointing=[0],
                                            loss_impls=["standard"], compile=False), log=said.append)
    assert res.mode == "measured" and any(t.status == "fit" for t in res.trials)
    assert (res.plan.block_size, res.plan.effective_batch, sum(res.plan.micro_batches)) == (64, 12, 12)
    assert res.block_size == 64 and res.effective_batch == 12
    assert said[0].startswith("schedule of 3 stages: fitting stages[1] (12 x 64 = 768 tokens per step)")


def test_probe_says_the_schedule_once_and_one_stage_is_singular(tmp_path, monkeypatch, capsys):
    """t5's cosmetics: `probe` printed 'schedule of 3 stages: fitting stages[1] ...' on stderr beside
    its stdout 'schedule:' block (said once now: the block; `run`, with no block, keeps the line);
    'schedule of 1 stages' and 'resumed on 1 rank(s)' read as 1 stage, 1 rank."""
    from cli_run import cli
    from trainer.config.stages import batch_words
    from trainer.metrics import describe_event
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    code, out, err = cli(monkeypatch, capsys, "probe", "--gpu", "rtx4070-12gb", "--preset", "tiny", "--set",
                         "block_size=64", "--set", f"stages={STAGES}")
    assert code == 0, err
    assert "schedule: 3 stages; the plan fits stages[1]" in out and "fitting stages[" not in err + out
    said = []
    run_probe(make_cfg(tmp_path), ProbeOptions(gpu="rtx4070-12gb"), log=said.append)  # what `run` logs
    assert any(s.startswith("schedule of 3 stages: fitting stages[1]") for s in said)
    one = make_cfg(tmp_path, stages="[dict(block_size=64, tokens_per_step=512)]")
    said = []
    run_probe(one, ProbeOptions(gpu="rtx4070-12gb"), log=said.append)
    assert any(s.startswith("schedule of 1 stage: fitting stages[0]") for s in said), said
    assert batch_words(one).startswith("schedule of 1 stage, each effective batch exact")
    ev = dict(event="world_size_changed", new_world_size=1, old_world_size=2, old_effective_batch=8,
              effective_batch=8, old_rank_batch=4, new_rank_batch=8, old_micro_batches=[4], micro_batches=[8])
    assert describe_event(ev).startswith("resumed on 1 rank (the checkpoint's run had 2)")
    assert describe_event({**ev, "new_world_size": 2}).startswith("resumed on 2 ranks (")
    # t9's L6: the splits as the plan writes them, not Python lists
    assert describe_event({**ev, "micro_batches": [4, 4]}).endswith("micro-batches 4 = 4 × 1 -> 8 = 4 × 2")


def test_a_resume_names_a_stages_change_as_the_config_writes_it(tmp_path):
    """t5's cosmetic: the --allow-changes refusal printed 'stages None -> (Stage(until_iter=35, ...), ...)',
    Python's repr; now the list as a config (or --set stages=) writes it."""
    from trainer.checkpoint.ckpt import resume_changes
    from trainer.config.stages import parse_stages
    saved, new = make_cfg(tmp_path, stages="None"), make_cfg(tmp_path)
    (line,) = [c for c in resume_changes(saved, new) if c.startswith("stages")]
    assert line == ("stages None -> [dict(until_iter=3, block_size=32, tokens_per_step=384), "
                    "dict(until_iter=5, block_size=64, tokens_per_step=768), dict(block_size=64, tokens_per_step=512)]")
    assert "Stage(" not in line
    assert parse_stages(eval(line.split(" -> ")[1])) == new.stages  # what it says reads back as the same list
