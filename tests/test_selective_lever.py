"""Selective activation checkpointing as a lever of the probe (issue 16, point 3): in the search
space beside full checkpointing, measured by the trials, chosen by the contest on measured time
and memory only, carried by plans and profiles, applied by the run, agreed across ranks."""
import json
import re
from types import SimpleNamespace

import pytest
import tomli_w
import tomllib

from autofit.devices.cpu_budget import BudgetedCpuDevice
from autofit.planning import agree
from autofit.planning.candidates import Levers, PlanError, Space, candidate_space, lever_combos
from autofit.planning.trials import TrialSettings, run_trial
from autofit.records import Candidate, PlanRecord, TrialRecord
from trainer.config.train_config import load_config

DEEP = ["n_layer=4", "n_embd=32", "n_head=2", "block_size=64", "vocab_size=64"]


def cfg_of(*overrides):
    return load_config(preset="tiny", overrides=[*DEEP, *overrides])


def test_the_space_holds_selective_beside_full_wherever_checkpointing_is_searched():
    cfg = cfg_of("batch_size=16", "gradient_accumulation_steps=1")
    space = candidate_space(cfg, "cpu", False, dtype="float32")
    assert space.checkpointing == [0, 1] and space.checkpointing_policies == ["selective", "full"]
    combos = {(lv.checkpointing, lv.checkpointing_policy, lv.loss_impl) for lv in lever_combos(space)}
    assert combos == {(0, "full", "standard"), (0, "full", "chunked"), (1, "selective", "standard"),
                      (1, "selective", "chunked"), (1, "full", "standard"), (1, "full", "chunked")}
    assert space.notes == []
    # checkpointing not searched (--checkpointing 0): no selective combination, and no note
    # repeating what the user typed (t7's L15)
    off = candidate_space(cfg, "cpu", False, dtype="float32", checkpointing=[0])
    assert {lv.checkpointing_policy for lv in lever_combos(off)} == {"full"}
    assert off.notes == []
    # a --dtype list searches what this card runs and says what it left out; bf16 alone is refused (t7's L17)
    t4 = candidate_space(cfg, "cuda", False, dtype="bfloat16,float16", compute_capability=(7, 5))
    assert t4.dtypes == ["float16"] and t4.notes[0].startswith("bfloat16 not searched: this GPU has no bf16 support")
    with pytest.raises(PlanError, match=r"--dtype bfloat16: this GPU has no bf16 support .*; use --dtype float16 "
                                         r"\(the same memory, with a GradScaler\) or --dtype any$"):  # the flag's words (t8)
        candidate_space(cfg, "cuda", False, dtype="bfloat16", compute_capability=(7, 5))
    # the user restricts the policy (--checkpointing-policy)
    full = candidate_space(cfg, "cpu", False, dtype="float32", checkpointing_policies=["full"])
    assert {(lv.checkpointing, lv.checkpointing_policy) for lv in lever_combos(full)} == {(0, "full"), (1, "full")}
    assert "--checkpointing-policy full" in full.notes[0]
    sel = candidate_space(cfg, "cpu", False, dtype="float32", checkpointing=[1], checkpointing_policies=["selective"])
    assert {(lv.checkpointing, lv.checkpointing_policy) for lv in lever_combos(sel)} == {(1, "selective")}
    with pytest.raises(PlanError, match="unknown policy 'selectiv'.*selective"):
        candidate_space(cfg, "cpu", False, checkpointing_policies=["selectiv"])


def test_a_torch_without_selective_checkpointing_searches_full_and_says_why(monkeypatch):
    import trainer.model.layers as layers
    monkeypatch.setattr(layers, "has_selective_checkpointing", lambda: False)
    cfg = cfg_of("batch_size=16", "gradient_accumulation_steps=1")
    space = candidate_space(cfg, "cpu", False, dtype="float32")
    assert space.checkpointing_policies == ["full"]
    assert {lv.checkpointing_policy for lv in lever_combos(space)} == {"full"}
    assert "create_selective_checkpoint_contexts" in space.notes[0]
    with pytest.raises(PlanError, match="--checkpointing-policy selective: torch .* has no"):
        candidate_space(cfg, "cpu", False, checkpointing_policies=["selective"])


@pytest.mark.parametrize("options", [[], ["pos_emb=rope", "norm=rmsnorm"]])
def test_a_selective_trial_measures_between_no_checkpointing_and_full_as_estimated(options):
    """The budgeted CPU device measures what each policy keeps: a trial that built its model
    without the candidate's policy would measure selective the same as full (or as none). The
    estimate, asked with the policy, is as close for selective as for the others (the top block's
    selective recompute holds one fp32 N x C more than a full one: without that term, -1.4 %)."""
    from autofit.planning.search import TrialRunner
    cfg = cfg_of("batch_size=16", "gradient_accumulation_steps=1", *options)
    peaks = {}
    for ck, policy in [(0, "full"), (1, "full"), (1, "selective")]:
        cand = Candidate(micro_batch=8, dtype="float32", compile=False, checkpointing=ck, loss_impl="standard",
                         checkpointing_policy=policy)
        dev = BudgetedCpuDevice(budget_bytes=256 * 2**20)
        r = run_trial(cfg, cand, dev, rank_batch=16, budget_bytes=256 * 2**20, settings=TrialSettings(steps=2))
        assert r.status == "fit" and r.checkpointing_policy == policy, r.note
        peaks[(ck, policy)] = r.measured_peak_bytes
        est = TrialRunner(cfg, dev, 256 * 2**20, TrialSettings()).estimate(cand)  # two micro-batches of 8
        assert abs(est - r.measured_peak_bytes) <= 0.002 * r.measured_peak_bytes, (ck, policy, est, r.measured_peak_bytes)
    assert peaks[(1, "full")] < peaks[(1, "selective")] < peaks[(0, "full")]


def test_the_estimate_is_asked_with_the_levers_policy():
    from autofit.planning.estimate import ModelShape, estimate_peak
    shape = ModelShape.from_config(cfg_of())  # the config's policy is 'full'
    args = dict(dtype="float32", checkpointing=1, loss_impl="standard", device="cpu")
    full = estimate_peak(shape, 8, **args).peak_bytes
    sel = estimate_peak(shape, 8, **args, checkpointing_policy="selective").peak_bytes
    none = estimate_peak(shape, 8, **{**args, "checkpointing": 0}).peak_bytes
    assert full < sel < none
    assert Levers("float32", 1, "standard", False, "selective").estimate_args()["checkpointing_policy"] == "selective"
    with pytest.raises(ValueError, match="checkpointing_policy"):
        estimate_peak(shape, 8, **args, checkpointing_policy="half")


@pytest.mark.parametrize("faster", ["selective", "full"])
def test_the_contest_chooses_the_policy_on_measured_time_only(faster, monkeypatch):
    """Both policies searched (the estimate promises more than either threshold), their step
    times injected: whichever is measured faster per token is the plan, nothing else decides."""
    from test_contest import Clock, plan_with
    cfg = cfg_of("batch_size=64", "gradient_accumulation_steps=1")
    space = Space(dtypes=["float32"], compile=[False], checkpointing=[0, 1], loss_impls=["standard"],
                  checkpointing_policies=["selective", "full"])
    factor = {"none": 1.0, faster: 0.5, ({"selective", "full"} - {faster}).pop(): 0.9}
    cost = lambda c: (1.0 + 30.0 / c.micro_batch) * factor[c.checkpointing_policy if c.checkpointing else "none"]
    res, runner = plan_with(cfg, 8_000_000, space, Clock(cost, p=0.0), monkeypatch)
    ran = {(c.checkpointing, c.checkpointing_policy) for c in runner.ran}
    assert {(1, "selective"), (1, "full")} <= ran
    assert (res.plan.checkpointing, res.plan.checkpointing_policy) == (1, faster)


def test_recomputation_that_cannot_pay_back_is_skipped_for_selective_too(monkeypatch):
    from test_contest import Clock, plan_with
    cfg = cfg_of("batch_size=64", "gradient_accumulation_steps=1")
    space = Space(dtypes=["float32"], compile=[False], checkpointing=[0, 1], loss_impls=["standard"],
                  checkpointing_policies=["selective", "full"])
    res, runner = plan_with(cfg, 8_000_000, space, Clock(lambda c: 1.0, p=0.0), monkeypatch)  # a flat rate
    assert not any(c.checkpointing for c in runner.ran)
    skipped = {t.checkpointing_policy: t.note for t in res.trials if t.checkpointing and t.status == "pruned"}
    assert set(skipped) == {"selective", "full"} and all("rate is already flat" in n for n in skipped.values())


def _plan(**kw) -> PlanRecord:
    return PlanRecord(mode="measured", micro_batch=8, grad_accum=2, micro_batches=[8, 8], effective_batch=16,
                      block_size=64, dtype="float32", compile=False, compile_after=0, checkpointing=1,
                      loss_impl="standard", budget_bytes=10**8, split="16 = 2 × 8", **kw)


def test_a_plan_written_before_the_policy_was_a_lever_loads_as_full(tmp_path, monkeypatch):
    from autofit.profiles.store import FittedPlan, find_plan, fingerprint, load_profile, save_plan
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    inputs = {"config": {"n_layer": 4}, "torch": "2.13.0"}
    trial = TrialRecord(micro_batch=8, dtype="float32", compile=False, checkpointing=1, loss_impl="standard",
                        status="fit", checkpointing_policy="selective")
    fp = fingerprint(inputs)
    path = save_plan("cpu-1gb", None, FittedPlan(fingerprint=fp, fingerprint_inputs=inputs, config_summary={},
                                                   plan=_plan(checkpointing_policy="selective"), trials=[trial]))
    assert find_plan(load_profile("cpu-1gb"), fp).plan.checkpointing_policy == "selective"  # round trip
    # the same file as an older autofit wrote it: no policy anywhere
    data = tomllib.loads(path.read_text())

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k != "checkpointing_policy"}
        return [strip(v) for v in d] if isinstance(d, list) else d
    old = strip(data)
    assert "checkpointing_policy" not in json.dumps(old)
    path.write_text(tomli_w.dumps(old))
    got = find_plan(load_profile("cpu-1gb"), fp)
    assert got.plan.checkpointing_policy == "full" and got.trials[0].checkpointing_policy == "full"


def test_the_run_applies_the_plans_policy():
    from autofit.launch.run import _apply_plan
    cfg = cfg_of()
    assert cfg.checkpointing_policy == "full"
    run_cfg = _apply_plan(cfg, _plan(checkpointing_policy="selective"))
    assert (run_cfg.checkpointing, run_cfg.checkpointing_policy) == (1, "selective")
    assert _apply_plan(run_cfg, _plan(checkpointing_policy="full")).checkpointing_policy == "full"


def test_the_plan_names_the_saved_ops_read_from_the_save_list(monkeypatch):
    from autofit.report import render
    from trainer.model import sac_ops
    words = render.checkpointing_words(1, "selective")
    assert words.startswith("activation checkpointing every 1 block, selective: matmuls (mm, addmm, bmm) and "
                            "attention outputs (4 SDPA kernels) kept")
    assert "full: only each checkpointed block's input kept" in render.checkpointing_words(2, "full")
    assert render.checkpointing_words(0, "selective") == "activation checkpointing off"
    line = render.plan_line(_plan(checkpointing_policy="selective"))
    assert "every 1 block, selective: matmuls" in line
    # the words come from SAC_SAVED_OPS, not a second copy of it
    monkeypatch.setattr(sac_ops, "SAC_SAVED_OPS", ("mm", "_scaled_dot_product_flash_attention"))
    assert "matmuls (mm) and attention outputs (1 SDPA kernel) kept" in render.checkpointing_words(1, "selective")


def test_the_ranks_agree_on_the_policies_every_rank_can_run(monkeypatch):
    from trainer.distributed.ranks import Ranks
    mine = Space(dtypes=["float32"], compile=[False], checkpointing=[0, 1], loss_impls=["standard"],
                 checkpointing_policies=["selective", "full"])
    old_torch = Space(dtypes=["float32"], compile=[False], checkpointing=[0, 1], loss_impls=["standard"],
                      checkpointing_policies=["full"])
    monkeypatch.setattr(agree, "ranks", lambda: Ranks(0, 0, 2))
    monkeypatch.setattr(agree.D, "all_gather_objects", lambda obj, r: [obj, old_torch])
    got = agree.space(mine)
    assert got.checkpointing_policies == ["full"] and "every rank" in got.notes[-1]
    assert mine.checkpointing_policies == ["selective", "full"] and mine.notes == []  # rank 0's own untouched
    # a trial's record is merged with the policy it ran
    rec = TrialRecord(micro_batch=4, dtype="float32", compile=False, checkpointing=1, loss_impl="standard",
                      checkpointing_policy="selective", status="fit", measured_peak_bytes=100, tokens_per_s=5.0)
    monkeypatch.setattr(agree.D, "all_gather_objects", lambda obj, r: [obj, obj])
    assert agree.trial(rec).checkpointing_policy == "selective"


def test_estimated_mode_prices_selective_recompute_below_full():
    from autofit.planning.estimate import ModelShape
    from autofit.planning.throughput import estimated_tokens_per_s
    shape = ModelShape.from_config(cfg_of())
    hw = SimpleNamespace(peak_bf16_tflops=0.01, peak_fp16_tflops=0.01)  # slow: the compute floor binds
    none, sel, full = (estimated_tokens_per_s(shape, 8, "bfloat16", ck, hw, pol)
                       for ck, pol in [(0, "full"), (1, "selective"), (1, "full")])
    assert full < sel < none
    assert full / none == pytest.approx(3 / 4) and sel / none == pytest.approx(1 - 0.085)


SMALL = ["--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
         "--set", "batch_size=8", "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1",
         "--set", "eval_interval=100", "--set", "log_interval=1"]


def test_a_selective_plan_is_saved_shown_and_trained_with_the_selective_context(tmp_path, monkeypatch, capsys):
    """probe --checkpointing-policy selective --save, then run --profile: the run's model checkpoints
    its blocks with selective checkpointing's context (a run that ignored the plan's policy would
    train the config's 'full' and never ask for it)."""
    from cli_run import cli
    import trainer.model.gpt as gpt
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "probe", "--device", "cpu", "--budget", "64MiB", *SMALL, "--dtype",
                         "float32", "--checkpointing", "1", "--checkpointing-policy", "selective", "--loss",
                         "standard", "--save", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["plan"]["checkpointing"], d["plan"]["checkpointing_policy"]) == (1, "selective")
    assert all(t["checkpointing_policy"] == "selective" for t in d["trials"])
    name = d["saved"]["profile"]
    code, out, _ = cli(monkeypatch, capsys, "profiles", "show", name)
    assert code == 0 and "selective" in out

    calls = []
    real = gpt.sac_context_fn
    monkeypatch.setattr(gpt, "sac_context_fn", lambda: calls.append(1) or real())
    code, out, err = cli(monkeypatch, capsys, "run", "--profile", name, *SMALL, "--max-steps", "1", "--out", "o",
                         "--no-progress")
    assert code == 0, err
    assert "no probe needed" in out and "every 1 block, selective: matmuls" in out
    assert len(calls) >= 2  # each of the two blocks checkpointed selectively, in every micro-batch
    run = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert run["plan"]["checkpointing_policy"] == "selective"


def test_probe_v_names_the_policy_and_why_selective_was_left_out(tmp_path, monkeypatch, capsys):
    from cli_run import cli
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    code, out, err = cli(monkeypatch, capsys, "probe", "--gpu", "rtx4070-12gb", "--preset", "gpt2-124m",
                         "--checkpointing", "0", "-v")
    assert code == 0, err
    # nothing checkpointed is searched, as the user asked: no note repeats it (t7's L15)
    assert "selective activation checkpointing not searched" not in out
    code, out, err = cli(monkeypatch, capsys, "probe", "--gpu", "rtx4070-12gb", "--preset", "gpt2-124m", "-v")
    assert code == 0, err
    assert re.search(r"\b1 sel\b", out)  # the candidates table's ckpt column
    assert "selective: matmuls (mm, addmm, bmm) and attention outputs" in out
    code, _, err = cli(monkeypatch, capsys, "probe", "--gpu", "rtx4070-12gb", "--checkpointing-policy", "half")
    assert code == 2 and "--checkpointing-policy: unknown policy 'half'" in err


def test_a_no_probe_run_names_its_levers_and_refuses_a_policy_with_nothing_checkpointed(tmp_path, monkeypatch, capsys):
    """t5 L5: a --no-probe run has no plan line, so its opening line names the levers it trains with
    where they are not the defaults; and checkpointing_policy 'selective' with checkpointing 0 (a
    no-op there) is refused in one line, as --checkpointing-policy with --checkpointing 0 is."""
    from cli_run import cli
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    base = ["run", "--device", "cpu", *SMALL, "--no-probe", "--max-steps", "1", "--no-progress"]
    code, out, err = cli(monkeypatch, capsys, *base, "--out", "a", "--set", "checkpointing=1",
                         "--set", "checkpointing_policy=selective", "--set", "loss_impl=chunked")
    assert code == 0, err
    assert "training on cpu (float32, activation checkpointing every 1 block (selective), chunked loss);" in out
    code, out, err = cli(monkeypatch, capsys, *base, "--out", "b")
    assert code == 0, err
    assert "training on cpu (float32);" in out  # the defaults: nothing to name
    code, out, err = cli(monkeypatch, capsys, *base, "--out", "c", "--set", "checkpointing_policy=selective")
    assert code == 2 and not (tmp_path / "c").exists()
    assert "checkpointing_policy 'selective' (--set) applies to checkpointed blocks, and checkpointing 0" in err


def test_a_dtype_left_out_of_a_list_is_said_without_v(tmp_path, monkeypatch, capsys):
    """t8's M4: --dtype bfloat16,float16 on a T4 said 'bfloat16 not searched' only under -v."""
    from cli_run import cli
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    code, out, err = cli(monkeypatch, capsys, "probe", "--gpu", "t4-16gb", "--preset", "tiny", "--dtype",
                         "bfloat16,float16")
    assert code == 0, err
    assert "bfloat16 not searched: this GPU has no bf16 support (compute capability 7.5 < 8.0)" in out + err


def test_the_config_policy_keys_a_plan_only_where_the_config_checkpoints(monkeypatch):
    """t12's L7 (session 18): `run --profile P --set checkpointing_policy=selective` with checkpointing
    0 said 'no saved plan for this model (checkpointing_policy full -> selective); probing'. Without
    checkpointing the config's policy changes nothing the probe does: the config-as-written contender
    is at policy 'full' and the space is the same, so the plan's fingerprint leaves it out; with
    checkpointing on it shapes that contender, and stays in."""
    from autofit.planning.candidates import candidate_space
    from autofit.planning.own import own_split
    from autofit.profiles.fingerprints import config_summary
    off_full, off_sel = cfg_of("checkpointing=0"), cfg_of("checkpointing=0", "checkpointing_policy=selective")
    on_full, on_sel = cfg_of("checkpointing=1"), cfg_of("checkpointing=1", "checkpointing_policy=selective")
    assert config_summary(off_full) == config_summary(off_sel)
    assert config_summary(on_sel)["checkpointing_policy"] == "selective"
    assert config_summary(on_full) != config_summary(on_sel)
    # what the fingerprint leaves out is what the probe does not read: the same space either way ...
    assert candidate_space(off_full, "cpu", False) == candidate_space(off_sel, "cpu", False)

    # ... and the same config-as-written contender; with checkpointing on, its policy is the config's
    best = {Levers("float32", k, "standard", False, p): 64 for k, p in ((0, "full"), (1, "full"), (1, "selective"))}

    def own_levers(cfg):
        runner = SimpleNamespace(cfg=cfg, rank_batch=cfg.effective_batch, kind="cpu",
                                 device=SimpleNamespace(info=SimpleNamespace(bf16_supported=False)),
                                 run=lambda c: TrialRecord(**c.model_dump(), status="fit"))
        t = own_split(cfg, runner, best)
        return t.checkpointing, t.checkpointing_policy
    batch = ("batch_size=4", "gradient_accumulation_steps=1")
    assert own_levers(cfg_of("checkpointing=0", *batch)) == own_levers(
        cfg_of("checkpointing=0", "checkpointing_policy=selective", *batch)) == (0, "full")
    assert own_levers(cfg_of("checkpointing=1", "checkpointing_policy=selective", *batch)) == (1, "selective")
