"""The training loop (trainer/loop.py): LR schedule, metrics, checkpoints and resume, OOM recovery
(injected, budget-driven, evaluation), the compile switch and Ctrl-C.

Every run is a ~35k-parameter GPT on the embedded corpus, fp32 on the CPU, a few optimizer steps.
"""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from autofit.devices.cpu_budget import BudgetedCpuDevice
from trainer.config.train_config import load_config
from trainer.checkpoint.ckpt import atomic_torch_save
from trainer.errors import TrainError
from trainer.evaluate import Evaluator
from trainer.loop import RunOptions, train
from trainer.meter import MeterCapabilities, NullMeter
from trainer.model.gpt import GPT, GPTConfig, clean_state_dict
from trainer.schedule import lr_at
from trainer.step import FaultInjector

CPU = torch.device("cpu")
STEPS = 8  # 2N
HALF = 4  # N
EFFECTIVE = 8  # batch_size 4 x gradient_accumulation_steps 2


def make_cfg(out_dir, **over):
    base = dict(n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=4,
                gradient_accumulation_steps=2, eval_iters=2, eval_interval=5, log_interval=1,
                dataset="embedded", out_dir=str(out_dir), max_iters=STEPS, warmup_iters=2,
                lr_decay_iters=STEPS, learning_rate=1e-3, min_lr=1e-4, dropout=0.0,
                dtype="float32", compile=False, device="cpu")
    base.update(over)
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in base.items()])


def opts(**kw) -> RunOptions:
    kw.setdefault("device", CPU)
    kw.setdefault("progress", False)
    return RunOptions(**kw)


def records(out_dir, kind: str | None = None) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if kind is None or r["type"] == kind]


def train_losses(out_dir) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in records(out_dir, "train"):
        assert r["step"] not in out, f"step {r['step']} logged twice"
        out[r["step"]] = r["loss"]
    return out


def events(out_dir, name: str | None = None) -> list[dict]:
    return [r for r in records(out_dir, "event") if name is None or r["event"] == name]


def assert_losses_close(got: dict[int, float], want: dict[int, float], rtol: float) -> None:
    assert sorted(got) == sorted(want)
    for step in sorted(want):
        assert got[step] == pytest.approx(want[step], rel=rtol), f"step {step}"


@pytest.fixture(autouse=True)
def _no_env_fault(monkeypatch):
    monkeypatch.delenv("AUTOFIT_FAULT_OOM_AT_STEP", raising=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops: several intra-op threads only fight each other (and other processes) for the
    # cores; on a loaded 2-core machine that is 20x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A fault-free run of STEPS steps with micro-batch 4, shared by the comparisons."""
    out = tmp_path_factory.mktemp("baseline")
    res = train(make_cfg(out), opts())
    return res, out


# ------------------------------------------------------------------------------- LR schedule


def test_lr_schedule_warmup_cosine_floor():
    cfg = make_cfg("unused", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    # linear warm-up, nanoGPT's (it + 1) / (warmup + 1)
    for it in range(10):
        assert lr_at(it, cfg) == pytest.approx(1e-3 * (it + 1) / 11)
    warm = [lr_at(it, cfg) for it in range(11)]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    # cosine: the peak at the end of warm-up, half way at the middle, min_lr at lr_decay_iters
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    decay = [lr_at(it, cfg) for it in range(10, 111)]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    # then the floor
    for it in (111, 200, 10_000):
        assert lr_at(it, cfg) == pytest.approx(1e-4)


def test_lr_constant_without_decay():
    cfg = make_cfg("unused", decay_lr=False, learning_rate=3e-4, warmup_iters=10)
    assert {lr_at(it, cfg) for it in (0, 5, 10, 50, 10_000)} == {3e-4}


# ------------------------------------------------------------------------------- metrics


def test_metrics_records(baseline):
    res, out = baseline
    recs = records(out)
    assert recs[0]["type"] == "run"
    assert recs[0]["effective_batch"] == EFFECTIVE and recs[0]["resumed_at"] is None
    train_recs = records(out, "train")
    assert [r["step"] for r in train_recs] == list(range(STEPS))
    cfg = make_cfg(out)
    for r in train_recs:
        for key in ("step", "loss", "lr", "tokens_per_s", "micro_batch", "grad_accum",
                    "peak_mem_bytes", "effective_batch"):
            assert key in r, key
        assert r["micro_batch"] == 4 and r["grad_accum"] == 2 and r["effective_batch"] == EFFECTIVE
        assert r["micro_batches"] == [4, 4]
        assert r["lr"] == pytest.approx(lr_at(r["step"], cfg))
        assert r["tokens_per_s"] > 0
        assert r["peak_mem_bytes"] is None  # plain CPU: nothing measured, nothing made up
        assert r["compiled"] is False
        assert math.isfinite(r["loss"])
    assert [r["loss"] for r in train_recs] == res.losses
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 5]
    for r in evals:
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["train_loss"])
    assert res.status == "finished" and res.steps == STEPS
    assert res.tokens == STEPS * EFFECTIVE * 32
    assert res.micro_batches == [4, 4]


def test_metrics_log_interval_and_measured_peak(tmp_path):
    dev = BudgetedCpuDevice(budget_bytes=1 << 30)
    res = train(make_cfg(tmp_path, log_interval=3, eval_interval=0), opts(meter=dev))
    recs = records(tmp_path, "train")
    assert [r["step"] for r in recs] == [0, 3, 6, 7]  # every 3rd, and the last one
    for r in recs:
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] > 0
    assert records(tmp_path, "eval") == []
    assert len(res.losses) == STEPS


# ------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("dropout,eval_interval", [(0.0, 5), (0.1, 4)])
def test_resume_gives_the_same_losses(tmp_path, dropout, eval_interval):
    full = tmp_path / "full"
    split = tmp_path / "split"
    train(make_cfg(full, dropout=dropout, eval_interval=eval_interval), opts())
    r1 = train(make_cfg(split, dropout=dropout, eval_interval=eval_interval), opts(max_steps=HALF))
    assert r1.steps == HALF and r1.status == "finished" and len(r1.losses) == HALF
    r2 = train(make_cfg(split, dropout=dropout, eval_interval=eval_interval), opts(resume=True))
    assert r2.steps == STEPS and len(r2.losses) == STEPS - HALF
    assert_losses_close(train_losses(split), train_losses(full), rtol=1e-6)
    # --max-steps does not change the schedule
    lr_full = {r["step"]: r["lr"] for r in records(full, "train")}
    lr_split = {r["step"]: r["lr"] for r in records(split, "train")}
    assert lr_split == lr_full
    # evaluations happen once per eval step, with the same results
    ev_full = [(r["step"], r["val_loss"]) for r in records(full, "eval")]
    ev_split = [(r["step"], r["val_loss"]) for r in records(split, "eval")]
    assert [s for s, _ in ev_split] == [s for s, _ in ev_full]
    for (_, a), (_, b) in zip(ev_split, ev_full):
        assert a == pytest.approx(b, rel=1e-6)
    runs = records(split, "run")
    assert [r["resumed_at"] for r in runs] == [None, HALF]


def test_dropout_changes_losses(tmp_path, baseline):
    # guards the dropout variant above: dropout must really draw random numbers
    train(make_cfg(tmp_path, dropout=0.1), opts(max_steps=2))
    got = train_losses(tmp_path)
    want = train_losses(baseline[1])
    assert got[1] != pytest.approx(want[1], rel=1e-6)


# ------------------------------------------------------------------------------- checkpoints


def test_checkpoint_atomic_and_loadable(tmp_path):
    train(make_cfg(tmp_path), opts(max_steps=3))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt.pt", "metrics.jsonl"]
    ck = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["iter_num"] == 3
    for key in ("model", "optimizer", "config", "sampler", "rng_cpu"):
        assert key in ck
    from trainer.checkpoint.schema import CHECKPOINT_FORMAT
    assert ck["autofit_format"] == CHECKPOINT_FORMAT  # an older autofit says 'upgrade' to a newer one's
    cfg = make_cfg(tmp_path)
    model = GPT(GPTConfig.from_train_config(cfg))
    model.load_state_dict(clean_state_dict(ck["model"]))  # strict: every tensor, right shapes


def test_atomic_save_leaves_the_old_file_and_no_temp_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    real_save = torch.save

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        atomic_torch_save({"a": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    # a failed save must not leave its temp file behind (checkpoints can be GBs)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_resume_refuses_changed_model_field(tmp_path):
    train(make_cfg(tmp_path), opts(max_steps=2))
    with pytest.raises(TrainError, match="n_embd"):
        train(make_cfg(tmp_path, n_embd=64), opts(resume=True))


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(TrainError, match="no checkpoint"):
        train(make_cfg(tmp_path), opts(resume=True))


def test_data_rewritten_under_the_run_stops_it_in_one_line_with_the_steps_done_saved(tmp_path, monkeypatch):
    import numpy as np
    from trainer.data.datasets import BatchSampler
    data = tmp_path / "toy"
    data.mkdir()
    for split, n in (("train", 20000), ("val", 4000)):
        (np.arange(n) % 200).astype(np.uint16).tofile(data / f"{split}.bin")
    read_rows, reads = BatchSampler.read_rows, []

    def rewrite_at_the_sixth_train_batch(self, split, offsets):
        reads.append(split)
        if reads.count("train") == 6 and split == "train":  # nanoGPT's prepare.py writing in place
            with open(data / "train.bin", "r+b") as f:
                f.write(np.full(64, 5, dtype=np.uint16).tobytes())
        return read_rows(self, split, offsets)

    monkeypatch.setattr(BatchSampler, "read_rows", rewrite_at_the_sixth_train_batch)
    out = tmp_path / "out"
    with pytest.raises(TrainError, match="train.bin was rewritten in place while this run read it") as e:
        train(make_cfg(out, dataset=str(data), vocab_size=256, max_iters=20, eval_interval=100), opts())
    step = torch.load(out / "ckpt.pt", weights_only=False)["iter_num"]
    assert f"ckpt.pt holds step {step}: --resume continues from it" in str(e.value)
    # train batches read: 2 by step 0's evaluation, then steps 0, 1, 2; the sixth is step 3's
    assert step == 3 and sorted(train_losses(out)) == [0, 1, 2]


def test_resume_from_a_diverged_checkpoint_names_the_tensor_not_the_learning_rate(tmp_path):
    """NaN in the saved weights or AdamW moments: the first step's loss check said 'lower
    learning_rate or grad_clip, or use bfloat16', none of which helps."""
    out = tmp_path / "o"
    train(make_cfg(out, max_iters=2), opts())
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    good = {k: v.clone() for k, v in ck["model"].items()}
    for poison, want in (("model", "model.transformer.h.1.mlp.c_fc.weight"), ("optimizer", "optimizer.state.")):
        ck["model"] = {k: v.clone() for k, v in good.items()}
        if poison == "model":
            ck["model"]["transformer.h.1.mlp.c_fc.weight"][0, 0] = float("inf")
        else:
            next(iter(ck["optimizer"]["state"].values()))["exp_avg_sq"].fill_(float("nan"))
        atomic_torch_save(ck, out / "ckpt.pt")
        with pytest.raises(TrainError, match=f"ckpt.pt: {want}.* holds NaN or inf"):
            train(make_cfg(out, max_iters=4), opts(resume=True))


def test_resume_corrupt_checkpoint(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="not a valid autofit checkpoint"):
        train(make_cfg(tmp_path), opts(resume=True))


def test_foreign_torch_file_is_not_a_checkpoint(tmp_path):
    torch.save({"a": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(TrainError, match="not an autofit checkpoint"):
        train(make_cfg(tmp_path), opts(resume=True))


def test_a_fresh_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    train(make_cfg(tmp_path), opts(max_steps=1))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(TrainError, match="--resume"):
        train(make_cfg(tmp_path), opts(max_steps=1))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


# ------------------------------------------------------------------------------- OOM recovery

FAULT_STEP = 3


@pytest.fixture(scope="module")
def shrunk_reference(tmp_path_factory):
    """Steps 0..k-1 with micro-batch 4, then micro-batch 2 to the end: what an OOM at step k
    followed by halving must reproduce."""
    out = tmp_path_factory.mktemp("shrunk_ref")
    train(make_cfg(out), opts(max_steps=FAULT_STEP))
    train(make_cfg(out), opts(resume=True, micro_batch=2))
    return train_losses(out)


def check_oom_run(out, res, baseline, new_mb: int) -> None:
    assert res.status == "finished" and res.steps == STEPS and len(res.losses) == STEPS
    assert res.tokens == baseline[0].tokens
    (ev,) = events(out, "oom_shrink")
    assert ev["step"] == FAULT_STEP
    assert ev["old_micro_batch"] == 4 and ev["new_micro_batch"] == new_mb
    assert ev["effective_batch"] == EFFECTIVE
    assert sum(ev["micro_batches"]) == EFFECTIVE and max(ev["micro_batches"]) == new_mb
    for r in records(out, "train"):
        assert r["effective_batch"] == EFFECTIVE
        if r["step"] < FAULT_STEP:
            assert (r["micro_batch"], r["grad_accum"]) == (4, 2)
        else:
            assert (r["micro_batch"], r["grad_accum"]) == (new_mb, EFFECTIVE // new_mb)


def test_injected_oom_from_env_shrinks_and_redoes_the_step(tmp_path, monkeypatch, baseline,
                                                             shrunk_reference):
    monkeypatch.setenv("AUTOFIT_FAULT_OOM_AT_STEP", str(FAULT_STEP))
    res = train(make_cfg(tmp_path), opts())
    check_oom_run(tmp_path, res, baseline, new_mb=2)
    assert res.micro_batches == [2, 2, 2, 2]
    assert_losses_close(train_losses(tmp_path), shrunk_reference, rtol=1e-5)
    # and the same as the fault-free run, up to summation order
    assert_losses_close(train_losses(tmp_path), train_losses(baseline[1]), rtol=1e-4)


def test_injected_oom_with_dropout_redraws_the_same_masks(tmp_path):
    ref = tmp_path / "ref"
    train(make_cfg(ref, dropout=0.1), opts(max_steps=FAULT_STEP))
    train(make_cfg(ref, dropout=0.1), opts(resume=True, micro_batch=2))
    out = tmp_path / "fault"
    train(make_cfg(out, dropout=0.1), opts(fault=FaultInjector(FAULT_STEP)))
    assert_losses_close(train_losses(out), train_losses(ref), rtol=1e-5)


def test_custom_shrink_and_on_event(tmp_path, baseline):
    asked: list[int] = []
    seen: list[dict] = []

    def shrink(failed: int) -> int | None:
        asked.append(failed)
        return 1

    res = train(make_cfg(tmp_path), opts(fault=FaultInjector(FAULT_STEP), shrink=shrink,
                                         on_event=seen.append))
    assert asked == [4]
    check_oom_run(tmp_path, res, baseline, new_mb=1)
    assert res.micro_batches == [1] * EFFECTIVE
    assert seen == events(tmp_path) == res.events
    assert seen[0]["event"] == "oom_shrink" and seen[0]["new_micro_batch"] == 1


def test_oom_with_nothing_smaller_left_is_a_train_error(tmp_path):
    with pytest.raises(TrainError, match="no smaller micro-batch"):
        train(make_cfg(tmp_path), opts(fault=FaultInjector(1), shrink=lambda failed: None))
    with pytest.raises(TrainError, match="no smaller micro-batch"):
        train(make_cfg(tmp_path / "mb1"), opts(fault=FaultInjector(1), micro_batch=1))


class LowerBudgetAt(BudgetedCpuDevice):
    """Lowers the budget at the `at_call`-th reset_peak (the start of optimizer step at_call - 1)."""

    def __init__(self, budget: int, at_call: int, new_budget: int):
        super().__init__(budget_bytes=budget)
        self.calls, self.at_call, self.new_budget = 0, at_call, new_budget

    def reset_peak(self) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            self.budget_bytes = self.new_budget
        super().reset_peak()


def steady_peak(tmp_path, micro_batch: int) -> int:
    out = tmp_path / f"peak{micro_batch}"
    train(make_cfg(out, eval_interval=0), opts(meter=BudgetedCpuDevice(budget_bytes=1 << 30),
                                               micro_batch=micro_batch, max_steps=3))
    return max(r["peak_mem_bytes"] for r in records(out, "train"))


def test_budget_lowered_mid_run_recovers_by_shrinking(tmp_path, baseline, shrunk_reference):
    p2, p4 = steady_peak(tmp_path, 2), steady_peak(tmp_path, 4)
    assert p2 < p4
    new_budget = (p2 + p4) // 2
    dev = LowerBudgetAt(1 << 30, at_call=FAULT_STEP + 1, new_budget=new_budget)
    out = tmp_path / "run"
    res = train(make_cfg(out, eval_interval=0), opts(meter=dev))
    check_oom_run(out, res, baseline, new_mb=2)
    assert "budgeted CPU device out of memory" in events(out, "oom_shrink")[0]["reason"]
    for r in records(out, "train"):
        if r["step"] >= FAULT_STEP:
            assert r["peak_mem_bytes"] <= new_budget
    assert_losses_close(train_losses(out), shrunk_reference, rtol=1e-5)


def test_resumed_run_counts_the_optimizer_state(tmp_path):
    """After --resume, the budgeted device must see the same live bytes as in an unbroken run:
    AdamW state loaded from the checkpoint is memory too."""
    full, split = tmp_path / "full", tmp_path / "split"
    big = 1 << 30
    train(make_cfg(full, eval_interval=0), opts(meter=BudgetedCpuDevice(budget_bytes=big)))
    train(make_cfg(split, eval_interval=0), opts(meter=BudgetedCpuDevice(budget_bytes=big),
                                                 max_steps=HALF))
    train(make_cfg(split, eval_interval=0), opts(meter=BudgetedCpuDevice(budget_bytes=big),
                                                 resume=True))
    want = {r["step"]: r["peak_mem_bytes"] for r in records(full, "train")}
    got = {r["step"]: r["peak_mem_bytes"] for r in records(split, "train")}
    assert got == want


# ------------------------------------------------------------------------------- eval OOM


def test_eval_oom_halves_eval_micro_batch_only(tmp_path, monkeypatch, baseline):
    real = Evaluator.batch_loss
    fired: list[int] = []

    def flaky(self, model, x, y):
        if not fired and self.micro_batch > 1:
            fired.append(self.micro_batch)
            raise torch.OutOfMemoryError("injected eval out of memory")
        return real(self, model, x, y)

    monkeypatch.setattr(Evaluator, "batch_loss", flaky)
    res = train(make_cfg(tmp_path), opts())
    assert fired == [4]
    (ev,) = events(tmp_path, "eval_oom_shrink")
    assert ev["eval_micro_batch"] == 2 and ev["step"] == 0
    assert ev["reason"] == "injected eval out of memory" and "oom_rank" not in ev  # one process: its own
    assert events(tmp_path, "oom_shrink") == []
    for r in records(tmp_path, "train"):
        assert (r["micro_batch"], r["grad_accum"]) == (4, 2)
    assert res.micro_batches == [4, 4]
    assert train_losses(tmp_path) == train_losses(baseline[1])  # training untouched
    got = [r["val_loss"] for r in records(tmp_path, "eval")]
    want = [r["val_loss"] for r in records(baseline[1], "eval")]
    assert got == pytest.approx(want, rel=1e-5)


def test_eval_oom_at_eval_micro_batch_one_is_one_line(tmp_path, monkeypatch):
    """t10's H1: the OOM escaped as torch.OutOfMemoryError, a traceback on the user's screen."""
    from trainer.errors import TrainError

    def always(self, model, x, y):
        raise torch.OutOfMemoryError("injected eval out of memory\nmore")

    monkeypatch.setattr(Evaluator, "batch_loss", always)
    with pytest.raises(TrainError) as e:
        train(make_cfg(tmp_path), opts(eval_micro_batch=1))
    assert str(e.value) == ("out of memory in evaluation at step 0, at eval micro-batch 1 (injected eval out of "
                            "memory): give a larger budget")



def two_threads_as_ranks():
    """A tiny GPT, the embedded dataset, and agree(rank, flag) -> the highest rank whose flag is set
    (None: none), as RankGroup.eval_agree answers: a real agreement between two threads (a barrier
    with a timeout, so a rank that never agrees fails the test)."""
    import threading

    from trainer.data.datasets import load_dataset
    cfg = load_config(None, overrides=["n_layer=1", "n_embd=32", "n_head=2", "block_size=16", "dropout=0.0"])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_train_config(cfg))
    flags, barrier = [False, False], threading.Barrier(2, timeout=60)

    def agree(rank: int, flag: bool) -> int | None:
        flags[rank] = flag
        barrier.wait()
        seen = max((r for r, f in enumerate(flags) if f), default=None)
        barrier.wait()
        return seen
    return model, load_dataset("embedded"), agree

def test_an_eval_oom_on_one_rank_halves_every_ranks_eval_micro_batch():
    """Two ranks as two threads whose `agree` is a real agreement (a barrier): rank 1 runs out of
    memory on its first eval batch only; both halve, redo that batch, and report the losses of an
    evaluation that never ran out of memory."""
    import threading

    from trainer.data.datasets import BatchSampler
    model, data, agree = two_threads_as_ranks()

    class OOMOnce(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.left = model, 1

        def forward(self, x, y):
            if self.left and x.shape[0] > 2:
                self.left -= 1
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return self.model(x, y)

    def evaluator(rank, events):
        return Evaluator(BatchSampler(data, 16, 7), iters=2, batch_size=8, micro_batch=8, device=torch.device("cpu"),
                         dtype="float32", meter=NullMeter(),
                         on_event=lambda kind, **kw: events.append((kind, kw)),
                         agree=lambda flag: agree(rank, flag))

    reference = Evaluator(BatchSampler(data, 16, 7), iters=2, batch_size=8, micro_batch=8, device=torch.device("cpu"),
                          dtype="float32", meter=NullMeter(),
                          on_event=lambda *a, **k: None).evaluate(model)
    events = [[], []]
    evals = [evaluator(r, events[r]) for r in (0, 1)]
    results = [None, None]
    modules = [model, OOMOnce()]

    def run(rank):
        results[rank] = evals[rank].evaluate(modules[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [e.micro_batch for e in evals] == [4, 4]
    # each says whose OOM it was: rank 0 names rank 1, rank 1 quotes its own error
    assert events == [[("eval_oom_shrink", {"eval_micro_batch": 4, "oom_rank": 1,
                                             "reason": "rank 1 ran out of memory in this evaluation batch"})],
                      [("eval_oom_shrink", {"eval_micro_batch": 4, "reason": "CUDA out of memory (injected)"})]]
    for got in results:
        assert got == pytest.approx(reference, rel=1e-5)


# ------------------------------------------------------------------------------- thrashing


class ThrashingMeter(NullMeter):
    """Allocator retries rise over the first four steps, then stay flat."""
    capabilities = MeterCapabilities(measures=False, reserved=False, alloc_retries=True, compile=True)

    def __init__(self):
        self.n = 0

    def alloc_retries(self) -> int:
        self.n += 1
        return min(self.n, 4)


def test_rising_allocator_retries_shrink_and_records_show_what_ran(tmp_path):
    res = train(make_cfg(tmp_path, eval_interval=0), opts(meter=ThrashingMeter()))
    assert res.status == "finished" and res.steps == STEPS
    (ev,) = events(tmp_path, "oom_shrink")
    assert ev["new_micro_batch"] == 2 and "allocator retries" in ev["reason"]
    first = ev["step"]  # the first step to run with the smaller micro-batch
    assert first == 4  # rises seen after steps 1, 2 and 3
    recs = {r["step"]: r for r in records(tmp_path, "train")}
    for step, r in recs.items():
        want = (4, 2) if step < first else (2, 4)
        assert (r["micro_batch"], r["grad_accum"]) == want, step
        assert r["micro_batches"] == [want[0]] * want[1]


# ------------------------------------------------------------------------------- compile




@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COMPILE_STEPS = 5


def compile_cfg(out):
    return make_cfg(out, compile=True, max_iters=COMPILE_STEPS, eval_interval=0)


def test_compile_switch_after_warmup(tmp_path, fresh_dynamo, baseline):
    res = train(compile_cfg(tmp_path), opts(compile_after=2, compile_backend="eager"))
    assert res.status == "finished" and res.steps == COMPILE_STEPS
    recs = records(tmp_path, "train")
    assert [r["compiled"] for r in recs] == [False, False, True, True, True]
    (ev,) = events(tmp_path, "compile_on")
    assert ev["step"] == 2 and ev["backend"] == "eager"
    want = {s: v for s, v in train_losses(baseline[1]).items() if s < COMPILE_STEPS}
    assert_losses_close(train_losses(tmp_path), want, rtol=1e-5)


def test_a_thrash_shrink_in_the_compile_window_rewraps_the_eager_module(tmp_path, fresh_dynamo, monkeypatch):
    """Thrashing inside the compile window with no compiled size to fall to drops compile; the
    ranks' wrapper (DDP) must then go around the eager module, not keep calling compiled code."""
    from trainer.loop import Trainer
    t = Trainer(compile_cfg(tmp_path), opts(meter=ThrashingMeter(), compile_after=2, compile_backend="eager",
                                            compiled_fit_sizes=[]))
    wrapped = []  # (compile given up when wrapped, the module wrapped)
    monkeypatch.setattr(t.group, "rewrap", lambda forward: wrapped.append((t.compile_failed, forward)))
    res = t.run()
    assert res.status == "finished"
    (ev,) = events(tmp_path, "compile_fallback_eager")
    assert ev["reason"].startswith("allocator retries")
    assert wrapped == [(False, t.forward), (True, t.model)]  # at the compile switch, then at the fallback
    assert [r["compiled"] for r in records(tmp_path, "train")] == [False, False, True, True, False]


def test_compile_window_oom_falls_back_to_eager(tmp_path, fresh_dynamo, baseline):
    res = train(compile_cfg(tmp_path), opts(compile_after=2, compile_backend="eager",
                                            compiled_fit_sizes=[], fault=FaultInjector(2)))
    assert res.status == "finished" and res.steps == COMPILE_STEPS
    (ev,) = events(tmp_path, "compile_fallback_eager")
    assert ev["step"] == 2 and ev["micro_batch"] == 4
    assert events(tmp_path, "oom_shrink") == [] and events(tmp_path, "compile_oom_shrink") == []
    recs = records(tmp_path, "train")
    assert [r["compiled"] for r in recs] == [False] * COMPILE_STEPS
    assert all(r["micro_batch"] == 4 for r in recs)
    assert res.micro_batches == [4, 4]
    want = {s: v for s, v in train_losses(baseline[1]).items() if s < COMPILE_STEPS}
    assert_losses_close(train_losses(tmp_path), want, rtol=1e-5)


def test_compile_window_oom_shrinks_to_a_compiled_fit_size(tmp_path, fresh_dynamo):
    res = train(compile_cfg(tmp_path), opts(compile_after=2, compile_backend="eager",
                                            compiled_fit_sizes=[2], fault=FaultInjector(2)))
    assert res.status == "finished" and res.steps == COMPILE_STEPS
    (ev,) = events(tmp_path, "compile_oom_shrink")
    assert ev["step"] == 2 and ev["old_micro_batch"] == 4 and ev["new_micro_batch"] == 2
    assert events(tmp_path, "compile_fallback_eager") == []
    recs = records(tmp_path, "train")
    assert [r["compiled"] for r in recs] == [False, False, True, True, True]
    assert [r["micro_batch"] for r in recs] == [4, 4, 2, 2, 2]
    assert all(r["effective_batch"] == EFFECTIVE for r in recs)
    assert res.micro_batches == [2, 2, 2, 2]


def test_oom_after_compile_window_is_an_ordinary_shrink(tmp_path, fresh_dynamo):
    # window = compile_after .. compile_after + 2; step 3 with compile_after=0 is outside
    res = train(compile_cfg(tmp_path), opts(compile_after=0, compile_backend="eager",
                                            compiled_fit_sizes=[], fault=FaultInjector(3)))
    assert res.status == "finished"
    (ev,) = events(tmp_path, "oom_shrink")
    assert ev["step"] == 3 and ev["new_micro_batch"] == 2
    assert events(tmp_path, "compile_fallback_eager") == []
    assert all(r["compiled"] for r in records(tmp_path, "train"))


# ------------------------------------------------------------------------------- Ctrl-C


class SigintAt(NullMeter):
    """Sends SIGINT (or `sig`) to this process at the `at_call`-th reset_peak (during that step)."""

    def __init__(self, at_call: int, sig: int = signal.SIGINT):
        self.calls, self.at_call, self.sig = 0, at_call, sig

    def reset_peak(self) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            os.kill(os.getpid(), self.sig)


def test_sighup_checkpoints_as_sigterm_does(tmp_path):
    """A closed terminal's SIGHUP ended a run at once, silently, with no checkpoint (h3, session 10)."""
    before = signal.getsignal(signal.SIGHUP)
    res = train(make_cfg(tmp_path), opts(meter=SigintAt(3, signal.SIGHUP)))  # during step 2
    assert signal.getsignal(signal.SIGHUP) is before
    assert res.status == "interrupted" and res.steps == 3
    assert torch.load(res.checkpoint, weights_only=True)["iter_num"] == 3
    assert records(tmp_path, "interrupted")[0]["signal"] == signal.SIGHUP


@pytest.mark.parametrize("always", [True, False])
def test_the_stop_notice_promises_a_save_only_where_one_is_sure(tmp_path, capfd, always):
    """t7's M8: with always_save_checkpoint=False a stop may keep ckpt.pt as the best evaluated
    model, so the first signal's line must not promise a save the next line takes back."""
    from trainer.interrupt import KEEP_BEST_STOP_NOTICE, STOP_NOTICE
    res = train(make_cfg(tmp_path, always_save_checkpoint=always), opts(meter=SigintAt(3)))
    assert res.status == "interrupted"
    err = capfd.readouterr().err
    assert (STOP_NOTICE in err) == always and (KEEP_BEST_STOP_NOTICE in err) == (not always)
    # evaluation off: no evaluated model to keep, so the save is sure (t8)
    res = train(make_cfg(tmp_path / "off", always_save_checkpoint=always, eval_interval=0), opts(meter=SigintAt(3)))
    assert res.status == "interrupted" and STOP_NOTICE in capfd.readouterr().err


def test_the_opening_line_names_peak_memory_only_where_it_is_measured(tmp_path, capfd):
    """t7's L12: a plain CPU run said 'peak memory below is measured', and its lines showed none."""
    train(make_cfg(tmp_path / "plain", max_iters=1), opts())
    said = capfd.readouterr()
    assert "step time and tokens/s below are measured" in said.out + said.err
    train(make_cfg(tmp_path / "budgeted", max_iters=1), opts(meter=BudgetedCpuDevice(budget_bytes=256 * 2**20)))
    said = capfd.readouterr()
    assert "step time, tokens/s and peak memory below are measured" in said.out + said.err


def test_sigint_checkpoints_and_resume_finishes(tmp_path, baseline):
    before = signal.getsignal(signal.SIGINT)
    res = train(make_cfg(tmp_path), opts(meter=SigintAt(3)))  # during step 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back
    assert res.status == "interrupted"
    assert res.steps == 3 and len(res.losses) == 3  # the step in flight was finished
    assert res.checkpoint is not None and res.checkpoint.exists()
    assert torch.load(res.checkpoint, weights_only=True)["iter_num"] == 3
    (rec,) = records(tmp_path, "interrupted")
    assert rec["step"] == 3 and rec["signal"] == signal.SIGINT
    res2 = train(make_cfg(tmp_path), opts(resume=True))
    assert res2.status == "finished" and res2.steps == STEPS
    assert_losses_close(train_losses(tmp_path), train_losses(baseline[1]), rtol=1e-6)


def test_a_ctrl_c_during_the_last_checkpoint_is_heard_and_the_checkpoint_written(tmp_path, monkeypatch):
    """The last save runs under the stop flag: a Ctrl-C during it is a stop request, not a
    KeyboardInterrupt that would lose the steps since the last checkpoint."""
    import trainer.loop as loop
    real = loop.atomic_torch_save

    def save_under_ctrl_c(obj, path, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C while the last checkpoint is written
        return real(obj, path, **kw)

    monkeypatch.setattr(loop, "atomic_torch_save", save_under_ctrl_c)
    # Python's own handler, even where the suite runs in a shell's background job (SIGINT ignored)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = train(make_cfg(tmp_path, eval_interval=0, max_iters=3), opts())
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C during the last save was not heard by the stop flag")
    finally:
        signal.signal(signal.SIGINT, old)
    assert res.status == "finished" and res.checkpoint is not None
    assert torch.load(res.checkpoint, weights_only=True)["iter_num"] == 3


def test_a_fatal_oom_keeps_the_completed_steps(tmp_path):
    """... and its line says so, as every other stop does (t4, session 13: it did not)."""
    cfg = make_cfg(tmp_path)
    with pytest.raises(TrainError, match="no smaller micro-batch") as e:
        train(cfg, opts(max_steps=4, fault=FaultInjector(2), shrink=lambda failed: None))
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 2
    assert str(e.value).endswith(f"; {tmp_path / 'ckpt.pt'} holds step 2: --resume continues from it with more "
                                 f"memory (other processes' memory freed)"), e.value
    # r1: at step 0 nothing trained; an untrained checkpoint would only block a new run on the folder
    with pytest.raises(TrainError, match="no smaller micro-batch is left to try") as e:
        train(make_cfg(tmp_path / "at0"), opts(max_steps=4, fault=FaultInjector(0), shrink=lambda failed: None))
    assert "holds step" not in str(e.value) and not (tmp_path / "at0" / "ckpt.pt").exists()



def test_the_way_to_more_memory_after_a_fatal_oom_is_the_devices_own():
    """t11's M4: 'with more memory' could not be followed on the budgeted CPU, whose resume keeps
    its budget unless a larger --budget is given; under --emulate a resume keeps the cap."""
    from trainer.redo import resume_with_more_memory
    assert resume_with_more_memory({"kind": "cpu-budgeted", "budget_bytes": 64 * 2**20}) == \
        "--resume with a --budget above 64.0 MiB continues from it with more memory"
    assert "a larger GPU" in resume_with_more_memory({"kind": "cuda", "memory_cap_bytes": None})
    capped = resume_with_more_memory({"kind": "cuda", "memory_cap_bytes": 4 * 2**30})
    assert "keeps its 4.0 GiB cap (--emulate's)" in capped and "without --emulate" in capped
    assert "GPU" not in resume_with_more_memory({"kind": "cpu"})


class ReservedMeter(NullMeter):
    """A meter with a caching allocator's two readings (as CUDA's): allocated and reserved."""
    capabilities = MeterCapabilities(measures=True, reserved=True, alloc_retries=False, compile=True)

    def peak_bytes(self) -> int:
        return 1000

    def peak_reserved_bytes(self) -> int:
        return 3000


def test_metrics_record_allocated_and_reserved_peaks(tmp_path):
    train(make_cfg(tmp_path, eval_interval=0), opts(meter=ReservedMeter(), max_steps=2))
    for r in records(tmp_path, "train"):
        assert (r["peak_mem_bytes"], r["peak_reserved_bytes"]) == (1000, 3000)


def eval_at_micro_batch_one_as_two_threads(raising: list) -> list:
    """Two ranks as threads (two_threads_as_ranks) evaluating at eval micro-batch 1, rank r's forward
    raising raising[r] (None: the tiny GPT's forward): what each rank raised."""
    import threading

    from trainer.data.datasets import BatchSampler
    model, data, agree = two_threads_as_ranks()

    class Raising(torch.nn.Module):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def forward(self, x, y):
            raise self.exc

    raised = [None, None]

    def run(rank):
        ev = Evaluator(BatchSampler(data, 16, 7), iters=1, batch_size=4, micro_batch=1, device=torch.device("cpu"),
                       dtype="float32", meter=NullMeter(), on_event=lambda *a, **k: None,
                       agree=lambda flag: agree(rank, flag))
        try:
            ev.evaluate(model if raising[rank] is None else Raising(raising[rank]))
        except Exception as e:
            raised[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return raised


def test_an_eval_oom_at_micro_batch_one_on_one_rank_stops_every_rank():
    """Rank 1 runs out of memory at eval micro-batch 1: it used to raise on its own while rank 0
    waited in the agreement for it (a hang until the collective's timeout); now both raise, rank 1
    its own OOM and rank 0 a line naming rank 1 (it said 'on another rank', not which)."""
    from trainer.distributed.ranks import CONSEQUENCES, RankFailed
    raised = eval_at_micro_batch_one_as_two_threads([None, torch.OutOfMemoryError("CUDA out of memory (injected)")])
    assert isinstance(raised[1], torch.OutOfMemoryError) and "injected" in str(raised[1])
    assert isinstance(raised[0], RankFailed) and str(raised[0]) == (
        "rank 1 ran out of memory in evaluation, at eval micro-batch 1 (its own error says why); stopping here too")
    # a consequence: the launcher says rank 1's own line, the cause, and leaves this one out
    assert any(w in str(raised[0]) for w in CONSEQUENCES) and not any(w in str(raised[1]) for w in CONSEQUENCES)


def test_another_ranks_oom_met_inside_this_ranks_forward_is_not_taken_for_its_own():
    """Under FSDP2 a rank meets another's OOM in a check-in of its own forward (OtherRankOOM): it
    must not enter it as its own in the agreement, or the highest rank named would be itself.
    Rank 0 runs out, rank 1 meets it so: rank 1 names rank 0 (and raises no OOM of its own)."""
    from trainer.distributed.ranks import OtherRankOOM, RankFailed
    met = OtherRankOOM("rank 0 ran out of memory in this step", injected=False, agreed=False)
    raised = eval_at_micro_batch_one_as_two_threads([torch.OutOfMemoryError("CUDA out of memory (injected)"), met])
    assert isinstance(raised[0], torch.OutOfMemoryError) and not isinstance(raised[0], RankFailed)
    assert isinstance(raised[1], RankFailed) and str(raised[1]).startswith("rank 0 ran out of memory in evaluation")


def test_a_run_that_gives_up_on_an_oom_resumes_on_the_steps_own_batch_and_rng(tmp_path):
    """No smaller micro-batch left: the run saves a checkpoint and stops. The step that failed did
    not happen, so a resume trains it on its own batch with its own dropout masks: the losses are
    those of a run that never failed (the sampler had already moved on, and the RNG was the failed
    attempt's)."""
    ref = tmp_path / "ref"
    train(make_cfg(ref, dropout=0.1), opts())
    out = tmp_path / "gave-up"
    with pytest.raises(TrainError, match="no smaller micro-batch"):
        train(make_cfg(out, dropout=0.1), opts(fault=FaultInjector(FAULT_STEP), shrink=lambda failed: None))
    train(make_cfg(out, dropout=0.1), opts(resume=True))
    assert sorted(train_losses(out)) == list(range(STEPS))
    assert_losses_close(train_losses(out), train_losses(ref), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_optimizer_state_is_made_before_step_0s_update_and_changes_no_number(tmp_path, monkeypatch, optimizer):
    """A fresh run makes its optimizer's state before step 0's update (an OOM then comes where a
    redo is whole, not inside the update, where it would apply a half-done update twice), with its
    step counters at 0 and no gradients held: the losses are those of lazily made state, exactly."""
    import trainer.redo as loop
    import trainer.step as step_mod
    real, seen = step_mod._optimizer_update, []

    def update(opt, *a, **k):
        if not seen:
            seen.append((len(opt.state), len([p for g in opt.param_groups for p in g["params"]]),
                         max(float(st.get("step", 0)) for st in opt.state.values()) if opt.state else None))
        return real(opt, *a, **k)
    monkeypatch.setattr(step_mod, "_optimizer_update", update)
    train(make_cfg(tmp_path / "primed", optimizer=optimizer), opts(max_steps=3))
    n_state, n_params, step = seen[0]
    assert n_state == n_params and step == 0
    monkeypatch.setattr(loop, "prime_optimizer", lambda *a, **k: None)
    train(make_cfg(tmp_path / "lazy", optimizer=optimizer), opts(max_steps=3))
    assert train_losses(tmp_path / "primed") == train_losses(tmp_path / "lazy")


def test_an_allocators_oom_making_the_optimizer_state_stops_at_once_and_is_not_redone(tmp_path, monkeypatch):
    """The optimizer state's line quotes the allocator ('CUDA out of memory. Tried to allocate'),
    which the meter reads as an OOM: before session 13 the loop took that TrainError for an OOM of
    the micro-batches, shrank, and made the state again until no micro-batch was left."""
    import trainer.redo as redo
    calls = []

    def prime(*a, **k):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
    monkeypatch.setattr(redo, "prime_optimizer", prime)
    seen = []
    with pytest.raises(TrainError, match="optimizer's state \\(AdamW\\) beside the weights, before step 0: no "
                                         "micro-batch fits.*CUDA out of memory"):
        train(make_cfg(tmp_path), opts(on_event=seen.append))
    assert calls == [1] and not [e for e in seen if "shrink" in e.get("event", "")]


# made fresh at each raise: an exception kept by the parametrize list would keep its traceback's tensors
@pytest.mark.parametrize("oom", [lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
                                 lambda: RuntimeError("HIP out of memory. Tried to allocate 2.00 MiB")],  # ROCm
                         ids=["OutOfMemoryError", "message-only"])
def test_an_oom_inside_the_optimizer_update_stops_the_run_instead_of_redoing_a_half_applied_step(
        tmp_path, monkeypatch, oom):
    """An OOM after the micro-batches, in the update, may come after some parameters or moments
    moved: a redo would apply that part twice. The run stops with one line (no shrink, no redo),
    and a probe's trial still records it as an out-of-memory error."""
    import trainer.step as step_mod
    from autofit.planning.candidates import Levers
    from autofit.planning.trials import TrialSettings, run_trial
    real = step_mod._optimizer_update
    calls = []

    def update(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise oom()
        return real(*a, **k)
    monkeypatch.setattr(step_mod, "_optimizer_update", update)
    seen = []
    with pytest.raises(TrainError, match="inside the optimizer update of step 2.*cannot be redone; this run has "
                                         "written no checkpoint yet, so start it again, with a smaller micro-batch"):
        train(make_cfg(tmp_path), opts(on_event=seen.append))
    assert not [e for e in seen if "shrink" in e.get("event", "")]
    calls.clear()
    cfg = make_cfg(tmp_path / "t")
    r = run_trial(cfg, Levers("float32", 0, "standard").candidate(4), BudgetedCpuDevice(budget_bytes=1 << 30),
                  rank_batch=8, budget_bytes=1 << 30, settings=TrialSettings(steps=3))
    assert r.status == "oom" and "optimizer update" in r.note


@pytest.mark.parametrize("resume", [False, True])
def test_an_oom_in_the_optimizer_update_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch, resume):
    """Once a checkpoint is on disk (written at step 5's evaluation, or the one resumed from) the
    line names it and its step; before session 13 it said 'resume from the last checkpoint' when
    the run had none, too. Nothing is written at the OOM: ckpt.pt still holds step 5."""
    import trainer.step as step_mod
    from trainer.checkpoint.ckpt import read_checkpoint
    real, calls = step_mod._optimizer_update, []
    if resume:
        train(make_cfg(tmp_path), opts(max_steps=5))  # ckpt.pt at step 5, the run's end

    def update(*a, **k):
        calls.append(1)
        if len(calls) == (2 if resume else 7):  # step 6 either way
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real(*a, **k)
    monkeypatch.setattr(step_mod, "_optimizer_update", update)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(TrainError) as got:
        train(make_cfg(tmp_path), opts(resume=resume))
    assert str(got.value).endswith(f"the step cannot be redone; resume from the last checkpoint, {ckpt} (step 5), "
                                   f"with --resume, with a smaller micro-batch if it happens again")
    assert "of step 6" in str(got.value) and read_checkpoint(ckpt, CPU)["iter_num"] == 5


def test_an_oom_in_clipping_the_gradients_is_redone_since_no_weight_has_moved(tmp_path, monkeypatch, baseline):
    """Clipping comes before the optimizer's step: an OOM there leaves every weight and moment as it
    was, so the step is redone (shrunk) like one in the micro-batches and the losses are the
    fault-free run's. Before session 12 it stopped the run as an OOM inside the update."""
    import trainer.step as step_mod
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # step 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real(*a, **k)
    monkeypatch.setattr(step_mod.torch.nn.utils, "clip_grad_norm_", clip)
    seen = []
    train(make_cfg(tmp_path), opts(on_event=seen.append))
    assert [(e["event"], e["step"]) for e in seen if "shrink" in e.get("event", "")] == [("oom_shrink", 2)]
    assert_losses_close(train_losses(tmp_path), train_losses(baseline[1]), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_resume_trains_with_this_configs_optimizer_settings(tmp_path, optimizer):
    """load_state_dict brings back the saved groups' settings; a resume with --allow-changes that
    changes weight_decay, beta2 or muon_lr must train with the new ones (the state is the
    checkpoint's): a no-decay group stays at 0."""
    from trainer.loop import Trainer
    first = dict(optimizer=optimizer, weight_decay=0.1, beta2=0.99, learning_rate=1e-3,
                 **({"muon_lr": 0.02} if optimizer == "muon" else {}))
    train(make_cfg(tmp_path, max_iters=2, **first), opts())
    changed = dict(first, weight_decay=0.0 if optimizer == "muon" else 0.05, beta2=0.9,
                   **({"muon_lr": 0.05} if optimizer == "muon" else {}))
    t = Trainer(make_cfg(tmp_path, max_iters=4, **changed), opts(resume=True))
    groups = t.optimizer.param_groups
    adamw = [g for g in groups if "betas" in g]
    assert all(g["betas"] == (0.9, 0.9) for g in adamw)
    assert sorted({g["weight_decay"] for g in adamw}) == sorted({0.0, changed["weight_decay"]})
    assert t.optimizer.state  # the moments are the checkpoint's
    if optimizer == "muon":
        (muon,) = [g for g in groups if "lr_scale" in g]
        assert muon["lr_scale"] == pytest.approx(0.05 / 1e-3) and muon["weight_decay"] == 0.0


@pytest.mark.parametrize("always", [False, True])
def test_always_save_checkpoint_false_keeps_the_best_checkpoint_at_the_end(tmp_path, monkeypatch, always):
    """nanoGPT's rule (its shakespeare_char config): with always_save_checkpoint=False ckpt.pt is
    the model of the best val loss; the end of the run does not overwrite it with a worse one."""
    vals = iter([3.0, 1.0, 2.0])  # steps 0, 5 (the best, saved) and 10 (worse)
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, model, what: {"train": 1.0, "val": next(vals)})
    seen = []
    res = train(make_cfg(tmp_path, max_iters=12, eval_interval=5, always_save_checkpoint=always),
                opts(on_event=seen.append))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    if always:
        assert saved["iter_num"] == 12 and res.checkpoint_step == 12
        assert not [e for e in seen if e["event"] == "kept_best"]
    else:
        assert saved["iter_num"] == 5 and saved["best_val_loss"] == 1.0 and res.checkpoint_step == 5
        (kept,) = [e for e in seen if e["event"] == "kept_best"]
        assert kept["best_step"] == 5 and kept["steps_not_saved"] == 7


def test_a_checkpoint_no_evaluation_measured_is_not_kept_as_the_best_at_the_next_stop(tmp_path, monkeypatch):
    """t7's M1 (session 15): with always_save_checkpoint=False and only step 0 evaluated, the first
    stop saved step 12's model, carrying step 0's val loss; the resume read that as 'ckpt.pt holds
    the best val loss's model' and its stop kept step 12, throwing the steps since away, every
    resume again. A model no evaluation measured is not the best: the next stop saves. A checkpoint
    that does hold the best evaluated model is still kept over later steps."""
    vals = iter([3.0, 1.0])
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, model, what: {"train": 1.0, "val": next(vals)})
    train(make_cfg(tmp_path, max_iters=12, eval_interval=100, always_save_checkpoint=False), opts())
    first = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert first["iter_num"] == 12 and first["best_val_loss"] == 3.0 and first["best_val_step"] is None
    seen = []
    res = train(make_cfg(tmp_path, max_iters=16, eval_interval=100, always_save_checkpoint=False),
                opts(resume=True, on_event=seen.append))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 16 and res.checkpoint_step == 16
    assert not [e for e in seen if e["event"] == "kept_best"]
    # evaluated at 20, the best: that file holds the best model, and a resume's stop keeps it
    train(make_cfg(tmp_path, max_iters=20, eval_interval=20, always_save_checkpoint=False), opts(resume=True))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["best_val_step"] == 20
    seen = []
    res = train(make_cfg(tmp_path, max_iters=23, eval_interval=20, always_save_checkpoint=False),
                opts(resume=True, on_event=seen.append))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 20 and res.checkpoint_step == 20
    (kept,) = [e for e in seen if e["event"] == "kept_best"]
    assert kept["best_step"] == 20 and kept["steps_not_saved"] == 3


def test_a_resume_that_runs_out_of_memory_loading_its_state_is_one_line(tmp_path):
    """The model fits the budget, the checkpoint's optimizer state beside it does not: one line
    naming the checkpoint, not a traceback from inside load_state_dict."""
    train(make_cfg(tmp_path, max_iters=2), opts())
    n = sum(v.numel() for v in torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"].values())
    dev = BudgetedCpuDevice(budget_bytes=int(4 * n * 2.5))  # the fp32 model and a little, not AdamW's 2x more
    with pytest.raises(TrainError, match=r"out of memory loading .*ckpt\.pt on cpu .*larger budget"):
        train(make_cfg(tmp_path, max_iters=4), opts(resume=True, meter=dev))


def test_data_rewritten_under_a_lazily_read_batch_saves_the_failed_steps_batch_as_next(tmp_path, monkeypatch):
    """r4 (session 15): a step batch above WHOLE_BATCH_MAX_BYTES is read one micro-batch at a
    time, inside the step, after its take() moved the sampler on. A read refused there (the data
    rewritten in place) saved the steps done with the sampler one batch ahead: the checkpoint held
    step 3 and the counter of step 4, so its resume skipped step 3's batch."""
    import numpy as np
    from trainer.data import batches
    from trainer.data.datasets import BatchSampler
    monkeypatch.setattr(batches, "WHOLE_BATCH_MAX_BYTES", 0)  # every step batch read lazily
    data = tmp_path / "toy"
    data.mkdir()
    for split, n in (("train", 20000), ("val", 4000)):
        (np.arange(n) % 200).astype(np.uint16).tofile(data / f"{split}.bin")
    read_rows, reads = BatchSampler.read_rows, []

    def rewrite_at_step_3s_first_micro_batch(self, split, offsets):
        reads.append(split)
        # train reads: 2 by step 0's evaluation (whole batches), then 2 micro-batches a step
        if reads.count("train") == 2 + 2 * 3 + 1 and split == "train":
            with open(data / "train.bin", "r+b") as f:
                f.write(np.full(64, 5, dtype=np.uint16).tobytes())
        return read_rows(self, split, offsets)

    monkeypatch.setattr(BatchSampler, "read_rows", rewrite_at_step_3s_first_micro_batch)
    out = tmp_path / "out"
    with pytest.raises(TrainError, match="train.bin was rewritten in place while this run read it"):
        train(make_cfg(out, dataset=str(data), vocab_size=256, max_iters=20, eval_interval=100), opts())
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] == 3 and sorted(train_losses(out)) == [0, 1, 2]
    assert ck["sampler"]["counters"]["train"] == 3  # step 3's batch is the resumed run's first
