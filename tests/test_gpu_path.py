"""The GPU path's rules, checked on the CPU: compile where it can run, the dtype a card really has,
one host sync per logged step, a run that stops at a non-finite loss, trials that leak, the
thrash lesson, the spill check's platforms, and the same split for compiled and eager trials."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import autofit.planning.search as search
import autofit.planning.trials as trials
from autofit.devices.cpu import PlainCpuDevice
from autofit.devices.cpu_budget import BudgetedCpuDevice
from autofit.records import Candidate
from autofit.planning.trials import TrialSettings, run_trial, trial_split
from trainer.compiler import compile_model, is_compiled, uncompile
from trainer.config.train_config import load_config
from trainer.errors import TrainError
from trainer.loop import RunOptions, train
from trainer.model.gpt import GPT, GPTConfig
from trainer.step import check_dtype, train_step

CPU = torch.device("cpu")


def cfg_for(out, **over):
    base = dict(n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=4, gradient_accumulation_steps=2,
                eval_iters=2, eval_interval=0, log_interval=1, dataset="embedded", out_dir=str(out), max_iters=6,
                warmup_iters=2, lr_decay_iters=6, learning_rate=1e-3, min_lr=1e-4, dtype="float32", compile=False,
                device="cpu")
    base.update(over)
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in base.items()])


def records(out, kind):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def events(out, name):
    return [r for r in records(out, "event") if r["event"] == name]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------ compile

class ShapeCounter:
    """A torch.compile backend that runs the graph eagerly and records each graph's input shapes."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, gm, example_inputs):
        tensors = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 3]
        self.batch_sizes.append(tensors[0].shape[0] if tensors else -1)
        return gm.forward


def test_plain_cpu_compiles_for_real_and_a_two_size_split_compiles_two_shapes(tmp_path, fresh_dynamo):
    counter = ShapeCounter()
    # effective batch 7 with micro-batch 4: [4, 3], the two sizes of the balanced split
    cfg = cfg_for(tmp_path, compile=True, batch_size=7, gradient_accumulation_steps=1, max_iters=5)
    res = train(cfg, RunOptions(device=CPU, progress=False, meter=PlainCpuDevice(), micro_batch=4,
                                compile_after=1, compile_backend=counter))
    assert res.status == "finished"
    (on,) = events(tmp_path, "compile_on")
    assert on["step"] == 1 and on["scope"] == "blocks"
    assert [r["compiled"] for r in records(tmp_path, "train")] == [False, True, True, True, True]
    # Dynamo really traced (regional: the blocks' graphs), and only the two shapes of the split
    assert counter.batch_sizes and set(counter.batch_sizes) == {4, 3}
    assert events(tmp_path, "compile_time")[0]["seconds"] >= 0


def test_budgeted_cpu_device_says_compile_cannot_run_there(tmp_path):
    cfg = cfg_for(tmp_path, compile=True, max_iters=3)
    res = train(cfg, RunOptions(device=CPU, progress=False, meter=BudgetedCpuDevice(budget_bytes=1 << 30),
                                compile_after=1))
    assert res.status == "finished"
    assert events(tmp_path, "compile_on") == []  # never claims to have switched on
    (ev,) = events(tmp_path, "compile_unavailable")
    assert "budgeted CPU device" in ev["reason"]
    assert not any(r["compiled"] for r in records(tmp_path, "train"))


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_losses_equal_eager_and_the_fallback_leaves_no_compiled_state(scope, fresh_dynamo):
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    eager = model(x, y).item()
    fwd = compile_model(model, "inductor", scope)
    assert is_compiled(model, fwd)
    assert fwd(x, y).item() == pytest.approx(eager, rel=1e-5)
    back = uncompile(model)
    assert back is model and not is_compiled(model, back)
    assert all(b._compiled_call_impl is None for b in model.transformer.h)


# ------------------------------------------------------------------------ dtype, ranks, losses

def test_bf16_is_the_compute_capability_not_torchs_emulation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))  # a T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation says yes
    cuda0 = torch.device("cuda", 0)
    assert check_dtype("auto", cuda0) == "float16"
    with pytest.raises(ValueError, match=r"no bf16 support \(compute capability 7.5 < 8.0\)"):
        check_dtype("bfloat16", cuda0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    assert check_dtype("auto", cuda0) == "bfloat16" and check_dtype("bfloat16", cuda0) == "bfloat16"
    assert check_dtype("auto", CPU) == "float32"


def test_several_ranks_without_a_rendezvous_is_one_line(tmp_path, monkeypatch):
    # WORLD_SIZE without torchrun's rendezvous: a clear line, not a hang or a traceback
    # (the several-rank runs themselves are in tests/test_multigpu.py)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for var in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TrainError, match=r"rank 0: cannot join the other 1 rank \("):
        train(cfg_for(tmp_path), RunOptions(device=CPU, progress=False))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import trainer.redo as loop  # the step is called from trainer.redo
    real = loop.train_step

    def nan_from_step_4(*a, step=None, **k):
        res = real(*a, step=step, **k)
        if step >= 4:
            res.loss_tensor = res.loss_tensor * float("nan")
        return res
    monkeypatch.setattr(loop, "train_step", nan_from_step_4)
    cfg = cfg_for(tmp_path, eval_interval=3, eval_iters=1, log_interval=2, max_iters=8)
    with pytest.raises(TrainError, match="not finite at step 4"):
        train(cfg, RunOptions(device=CPU, progress=False))
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 3  # the checkpoint of the eval at step 3, untouched
    assert all(r["step"] < 4 for r in records(tmp_path, "train"))


def test_train_step_leaves_its_figures_on_the_device():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randint(0, 32, (4, 8)), torch.randint(0, 32, (4, 8))
    res = train_step(model, opt, x, y, [2, 2], grad_clip=1.0)
    assert isinstance(res.loss_tensor, torch.Tensor) and isinstance(res.grad_norm_tensor, torch.Tensor)
    assert res.loss == pytest.approx(float(res.loss_tensor)) and res.tokens == 32


# ------------------------------------------------------------------------ trials

def tiny(effective):
    return load_config(preset="tiny", overrides=["n_layer=1", "n_embd=32", "n_head=2", "block_size=32",
                                                 "vocab_size=256", f"batch_size={effective}",
                                                 "gradient_accumulation_steps=1"])


def test_compiled_and_eager_trials_run_the_same_split():
    assert trial_split(23, 10) == [10, 10]  # memory and speed at exactly the candidate's size
    assert trial_split(7, 5) == [5, 5]  # with gradients alive during the second micro-batch
    assert trial_split(4, 4) == [4]  # the whole batch in one micro-batch


def test_a_trial_that_keeps_memory_is_a_leak_not_a_fit(monkeypatch):
    kept = []
    real = trials.train_step

    def leaky(*a, **k):
        kept.append(torch.ones(100_000))  # 400 kB that outlive the trial
        return real(*a, **k)
    monkeypatch.setattr(trials, "train_step", leaky)
    dev = BudgetedCpuDevice(budget_bytes=50_000_000)
    cand = Candidate(micro_batch=2, dtype="float32", compile=False, checkpointing=0, loss_impl="standard")
    rec = run_trial(tiny(4), cand, dev, rank_batch=4, budget_bytes=50_000_000)
    assert rec.status == "leak" and rec.leaked_bytes >= 800_000 and "did not come back" in rec.note
    kept.clear()
    monkeypatch.setattr(trials, "train_step", real)
    ok = run_trial(tiny(4), cand, dev, rank_batch=4, budget_bytes=50_000_000)
    assert ok.status == "fit" and ok.leaked_bytes == 0


def test_spill_check_only_where_a_driver_can_spill(monkeypatch):
    monkeypatch.setattr(search.platform, "system", lambda: "Windows")
    assert search.driver_can_spill()
    monkeypatch.setattr(search.platform, "system", lambda: "Linux")
    monkeypatch.setattr("builtins.open", lambda *a, **k: __import__("io").StringIO("Linux version 6.1 (gcc)"))
    assert not search.driver_can_spill()
    monkeypatch.setattr("builtins.open", lambda *a, **k: __import__("io").StringIO("Linux 5.15-microsoft-standard-WSL2"))
    assert search.driver_can_spill()


def test_retiming_alternates_the_contenders(monkeypatch):
    """The contest re-times its contenders in rounds, A B C A B C: every contender once before any
    twice, never the same one twice in a row (a burst of load during one stretch of time cannot
    fall on one contender's readings only)."""
    import autofit.planning.contest as contest
    import autofit.planning.planner as planner
    from autofit.planning.budget import compute_budget
    order = []
    real_retime = contest.run_trial

    def spy(cfg, cand, device, **kw):
        order.append((cand.loss_impl, cand.micro_batch))
        return real_retime(cfg, cand, device, **kw)
    monkeypatch.setattr(contest, "run_trial", spy)
    import autofit.planning.trials as trials
    real_steps = trials._timed_steps

    def flat_clock(rec, steps, tdev, step):  # the steps run; their clocks are injected
        real_steps(rec, steps, tdev, step)
        # the same time per sequence at every size and loss: a tie that the contest must re-time (the
        # real clocks under a burst of load made one combination 1.25x slower and no contest ran)
        d = rec.micro_batch * 1e-3
        clock = [[0.0, 0.9 * d, d] for _ in range(steps)]
        return clock, [list(c) for c in clock]
    monkeypatch.setattr(trials, "_timed_steps", flat_clock)
    dev = BudgetedCpuDevice(budget_bytes=3_000_000)
    space = planner.Space(dtypes=["float32"], compile=[False], checkpointing=[0], loss_impls=["standard", "chunked"])
    planner.probe_measured(tiny(8), dev, compute_budget(dev.info, 0.1), space, settings=TrialSettings(steps=2))
    n = len(set(order))
    # both combinations' largest fit (their smaller sizes too, unless already 1.25x slower)
    assert n >= 2
    assert len(set(order[:n])) == n  # the first round visits every contender once
    assert all(a != b for a, b in zip(order, order[1:]))


class GrowingContext(BudgetedCpuDevice):
    """A CUDA-like device (its trials run on the budgeted CPU device): `later_bytes` appear outside
    the allocator once a trial has run (refresh_context)."""
    context_bytes = 0

    def __init__(self, later_bytes: int, **kw):
        super().__init__(**kw)
        self.later_bytes = later_bytes

    @property
    def info(self):
        from autofit.devices.device import DeviceInfo
        return DeviceInfo(kind="cuda", name="fake", index=0, total_bytes=8_000_000, free_bytes=8_000_000,
                          used_by_others_bytes=0, compute_capability=(9, 0), driver_version=None,
                          cuda_version=None, source="nvml")

    def refresh_context(self):
        self.context_bytes = self.later_bytes
        return self.context_bytes


def test_the_budget_is_recomputed_from_the_context_measured_after_the_first_trial(monkeypatch):
    import autofit.planning.planner as planner
    import autofit.planning.search as search
    from autofit.planning.budget import compute_budget

    dev = GrowingContext(1 << 20, budget_bytes=8_000_000)
    # its trials run on the budgeted CPU device, so the CUDA estimate (cuBLAS's 64 MiB of
    # workspaces among it) and its error bound say nothing about them: every size is run
    monkeypatch.delitem(search.ESTIMATE_ERROR_BOUND, "cuda")
    before = compute_budget(dev.info, 0.1, context_bytes=0, workspace_bytes=0)
    logs = []
    space = planner.Space(dtypes=["float32"], compile=[False], checkpointing=[0], loss_impls=["standard"])
    res = planner.probe_measured(tiny(8), dev, before, space, settings=TrialSettings(steps=2), log=logs.append)
    assert res.trials[0].micro_batch == 1  # the smallest trial ran first
    assert res.budget.budget_bytes == int((8_000_000 - (1 << 20)) * 0.9) < before.budget_bytes
    assert res.plan.budget_bytes == res.budget.budget_bytes
    assert any("after the first trial" in t.how for t in res.budget.terms)
    assert any("grew" in line for line in logs)


def test_a_first_trial_over_the_budget_lowered_after_it_is_no_fit(monkeypatch):
    """The smallest trial runs before the context is measured again; where the lowered budget is
    below its peak, it is judged again: over budget, so nothing fits (no plan 'within' a budget
    its peak is above)."""
    import autofit.planning.planner as planner
    import autofit.planning.search as search
    from autofit.planning.budget import compute_budget
    from autofit.planning.candidates import PlanError
    cfg = tiny(8)
    space = planner.Space(dtypes=["float32"], compile=[False], checkpointing=[0], loss_impls=["standard"])
    probe_dev = BudgetedCpuDevice(budget_bytes=8_000_000)
    first = run_trial(cfg, planner.lever_combos(space)[0].candidate(1), probe_dev, rank_batch=8,
                      budget_bytes=8_000_000, settings=TrialSettings(steps=2))
    assert first.status == "fit"

    monkeypatch.delitem(search.ESTIMATE_ERROR_BOUND, "cuda")
    # the context measured after the first trial leaves a budget just below that trial's peak
    dev = GrowingContext(8_000_000 - int(first.measured_peak_bytes * 0.99 / 0.9), budget_bytes=8_000_000)
    before = compute_budget(dev.info, 0.1, context_bytes=0, workspace_bytes=0)
    with pytest.raises(PlanError, match="nothing fits"):
        planner.probe_measured(cfg, dev, before, space, settings=TrialSettings(steps=2))



def test_after_the_budgets_are_measured_again_the_device_named_is_the_new_smallest_ranks(monkeypatch):
    """Two ranks, faked (agree's gathers answer for rank 1): rank 1's budget is the smaller at open, so
    the probe starts on it; after the first trial this rank's context grows and its budget falls below
    rank 1's. The plan fits this rank's budget, so the device line and the profile a --save names
    and sizes are this rank's device: they stayed rank 1's (the pick made before the re-measure)."""
    from autofit.devices.device import DeviceInfo
    from autofit.launch.probe import ProbeOptions, probe_on
    from autofit.planning import agree
    from autofit.planning.budget import Budget, compute_budget
    from trainer.distributed import ranks as D

    other = DeviceInfo(kind="cuda", name="rank-1 card", index=1, total_bytes=7_777_778, free_bytes=7_777_778,
                       used_by_others_bytes=0, compute_capability=(9, 0), driver_version=None, cuda_version=None,
                       source="nvml")
    others_budget = compute_budget(other, 0.1, context_bytes=0, workspace_bytes=0)  # its context never grows

    def gather(obj, r):  # rank 1 ran the same trials to the same records; its budget and device are its own
        kinds = [type(x) for x in obj] if isinstance(obj, tuple) else type(obj)
        theirs = {Budget: others_budget, (Budget, DeviceInfo): (others_budget, other),
                  (DeviceInfo, int): (other, others_budget.budget_bytes)}  # the last: the gather before the fix
        return [obj, theirs.get(tuple(kinds) if isinstance(kinds, list) else kinds, obj)]
    monkeypatch.setattr(agree, "ranks", lambda: D.Ranks(0, 0, 2))
    monkeypatch.setattr(D, "all_gather_objects", gather)
    monkeypatch.setattr(D, "any_over_ranks", lambda flag, r: bool(flag))
    monkeypatch.setattr(agree, "agreement", lambda: None)  # no process group: the trials run unwrapped
    monkeypatch.delitem(search.ESTIMATE_ERROR_BOUND, "cuda")  # trials on the CPU: every size is run
    dev = GrowingContext(1 << 20, budget_bytes=8_000_000)
    mine = compute_budget(dev.info, 0.1, context_bytes=0, workspace_bytes=0)
    assert others_budget.budget_bytes < mine.budget_bytes  # rank 1 binds at first
    cfg = load_config(preset="tiny", overrides=["n_layer=1", "n_embd=32", "n_head=2", "block_size=32", "vocab_size=256",
                                                "batch_size=8", "gradient_accumulation_steps=1", "parallelism=ddp"])
    opts = ProbeOptions(dtype="float32", compile=False, checkpointing=[0], loss_impls=["standard"], trial_steps=2)
    logs = []
    res = probe_on(cfg, dev, mine, opts, logs.append)
    lowered = int((8_000_000 - (1 << 20)) * 0.9)
    assert lowered < others_budget.budget_bytes  # this rank binds now
    assert res.budget.budget_bytes == res.plan.budget_bytes == lowered
    assert res.device.name == "fake" and res.device_ranks == "rank 0's, the smallest budget of 2 ranks"
    assert any(line.startswith("the ranks' budget after the first trial: ") and "rank 0's" in line for line in logs)


def test_cublas_workspace_is_counted_once_the_budget_only_takes_what_is_outside_the_allocator():
    """The estimate holds cuBLAS's workspace (it is allocated through the caching allocator); the
    budget subtracts a workspace term only where the context is assumed, not measured."""
    from autofit.planning.budget import ASSUMED_CONTEXT_BYTES, ASSUMED_WORKSPACE_BYTES, device_budget
    from autofit.devices.device import DeviceInfo
    from autofit.planning.estimate import CUDA_WORKSPACE_BYTES, ModelShape, estimate_peak

    info = DeviceInfo(kind="cuda", name="fake", index=0, total_bytes=8 << 30, free_bytes=8 << 30,
                      used_by_others_bytes=0, compute_capability=(9, 0), driver_version=None,
                      cuda_version=None, source="nvml")

    class Measured:
        context_bytes = 300 << 20
    Measured.info = info

    class Assumed:
        context_bytes = None
    Assumed.info = info

    measured, assumed = device_budget(Measured(), margin=0.0), device_budget(Assumed(), margin=0.0)
    assert measured.usable_bytes == (8 << 30) - (300 << 20)
    assert assumed.usable_bytes == (8 << 30) - ASSUMED_CONTEXT_BYTES - ASSUMED_WORKSPACE_BYTES
    assert [t.bytes for t in measured.terms if t.label == "library workspaces"] == [0]
    shape = ModelShape.from_config(tiny(8))
    kw = dict(micro_batch=2, dtype="float32", checkpointing=0, loss_impl="standard")
    on_cuda, on_cpu = estimate_peak(shape, device="cuda", **kw), estimate_peak(shape, device="cpu", **kw)
    assert on_cuda.breakdown["workspace"] - on_cpu.breakdown["workspace"] == CUDA_WORKSPACE_BYTES


def test_unconfirmed_thrashing_is_not_a_profile_lesson(monkeypatch):
    import autofit.launch.run as launch
    recorded = []
    monkeypatch.setattr(launch, "record_event", lambda *a, **k: recorded.append((a, k)))
    on_event = launch._profile_recorder("rtx4070-12gb", "abc", log=lambda s: None)
    base = {"event": "oom_shrink", "step": 5, "old_micro_batch": 8, "new_micro_batch": 4, "reason": "retries"}
    on_event({**base, "cause": "thrash", "confirmed": False})
    assert recorded == []
    on_event({**base, "cause": "thrash", "confirmed": True})
    on_event(base)  # a real OOM
    assert len(recorded) == 2 and all(k["safe_micro_batch"] == 4 for _, k in recorded)


def test_emulation_caps_to_the_profiles_usable_memory(monkeypatch):
    import autofit.devices.cuda as cuda
    from autofit.launch.probe import ProbeOptions
    from autofit.launch.profile_gpu import gpu_for_profile
    from autofit.devices.device import DeviceInfo
    from autofit.devices.hardware import ASSUMED_DRIVER_RESERVED_SHARE, get_hardware
    h100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", index=0, total_bytes=81559 * 2**20,
                      free_bytes=80000 * 2**20, used_by_others_bytes=0, compute_capability=(9, 0),
                      driver_version="550.54", cuda_version="12.4", source="nvml")
    asked = {}
    monkeypatch.setattr(cuda, "detect_gpu", lambda index=0: h100)
    monkeypatch.setattr(cuda, "open_cuda_device", lambda index, info, emulate_usable_bytes, emulate_how: asked.update(
        usable=emulate_usable_bytes, note=info.note, how=emulate_how) or "device")
    hw = get_hardware("rtx4070-12gb").model_dump(mode="json")
    assert hw["driver_reserved_bytes"] is None  # not measured on a 4070 yet
    gpu_for_profile("rtx4070-12gb", hw, True, ProbeOptions())
    assert asked["usable"] == hw["memory_bytes"] - int(hw["memory_bytes"] * ASSUMED_DRIVER_RESERVED_SHARE)
    assert "assumed" in asked["note"] and "an assumed 3% driver reserve" in asked["how"]
    gpu_for_profile("rtx4070-12gb", {**hw, "driver_reserved_bytes": 300 * 2**20}, True, ProbeOptions())
    assert asked["usable"] == hw["memory_bytes"] - 300 * 2**20  # a measured figure wins
    assert "(measured, in the profile)" in asked["how"]
