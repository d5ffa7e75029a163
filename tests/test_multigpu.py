"""Several ranks on the CPU: torchrun starts 2 ranks on gloo, each with its own budgeted CPU device
(AUTOFIT_RANK_BUDGETS), training a ~35k-parameter GPT on the embedded corpus in fp32.

Every launch is a subprocess with a timeout, so a hang fails the test instead of blocking CI, and
AUTOFIT_DIST_TIMEOUT bounds any collective. Runs are shared between assertions: the 1-rank and
2-rank reference runs are module fixtures that the OOM, SIGTERM and FSDP2 tests compare against.
The in-process tests at the end pin the pieces (agreements, rows, fault selector) without torchrun.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autofit.planning import agree
from autofit.records import TrialRecord
from trainer.config.train_config import load_config
from trainer.distributed.ranks import Ranks
from trainer.distributed.shares import check_divisible
from trainer.errors import TrainError
from trainer.loop import RunOptions, train
from trainer.step import FaultInjector

STEPS = 40
CONFIG = dict(n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=4, gradient_accumulation_steps=2,
              dataset="embedded", max_iters=STEPS, warmup_iters=2, lr_decay_iters=STEPS, learning_rate=1e-3,
              min_lr=1e-4, eval_interval=10, eval_iters=1, log_interval=1, dropout=0.0, dtype="float32",
              compile=False, device="cpu")
SETS = [a for k, v in CONFIG.items() for a in ("-s", f"{k}={v}")]
LAUNCH_TIMEOUT = 240  # seconds: generous for a loaded 2-core machine; a hang still fails


def env(tmp: Path, budgets: str = "64MiB,64MiB", **extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOFIT_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                  "MASTER_"))}
    e.update(OMP_NUM_THREADS="1", AUTOFIT_HOME=str(tmp / "home"), AUTOFIT_RANK_BUDGETS=budgets,
             AUTOFIT_DIST_TIMEOUT="60", COLUMNS="200", **extra)
    return e


def torchrun(args: list[str], e: dict, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "autofit", *args]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def autofit_proc(args: list[str], e: dict) -> subprocess.Popen:
    """`python -m autofit ...` (its --nproc-per-node starts torchrun itself), in the background."""
    return subprocess.Popen([sys.executable, "-m", "autofit", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def records(out: Path, kind: str | None = None) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if kind is None or r["type"] == kind]


def losses(out: Path) -> dict[int, float]:
    got: dict[int, float] = {}
    for r in records(out, "train"):
        assert r["step"] not in got, f"step {r['step']} logged twice"
        got[r["step"]] = r["loss"]
    return got


def assert_close(got: dict[int, float], want: dict[int, float], rel: float) -> None:
    assert got and set(got) <= set(want)
    for step in sorted(got):
        assert got[step] == pytest.approx(want[step], rel=rel), f"step {step}"


def wait_for_step(out: Path, proc: subprocess.Popen, step: int, limit: float = LAUNCH_TIMEOUT) -> None:
    t0 = time.monotonic()
    while not any(r["step"] >= step for r in records(out, "train")):
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() - t0 < limit, "no training step within the limit"
        time.sleep(0.02)


def ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    """The 1-rank reference, in this process: same effective batch (8), micro-batch 4 x 2."""
    out = tmp_path_factory.mktemp("one")
    cfg = load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in {**CONFIG, "out_dir": out}.items()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(cfg, RunOptions(device=torch.device("cpu"), progress=False))
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "losses": losses(out), "tokens_per_step": res.tokens // res.steps}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The 2-rank DDP reference: the config as written (--no-probe), micro-batch 4 per rank."""
    tmp = tmp_path_factory.mktemp("two")
    ok(torchrun(["run", "--preset", "tiny", *SETS, "--out", str(tmp / "out"), "--no-probe", "--no-progress"],
                env(tmp)))
    return tmp / "out"


def test_two_ranks_train_as_one_rank_with_the_same_effective_batch(one_rank, two_ranks):
    assert sorted(losses(two_ranks)) == list(range(STEPS))
    assert_close(losses(two_ranks), one_rank["losses"], rel=1e-5)
    for rec in records(two_ranks, "train"):  # the same tokens per optimizer step, split in two
        assert rec["world_size"] == 2 and rec["micro_batches"] == [4]
        assert rec["effective_batch"] * CONFIG["block_size"] == one_rank["tokens_per_step"]
    run = records(two_ranks, "run")[0]
    assert run["world_size"] == 2 and run["parallelism"] == "ddp"
    # the eval batches split across the ranks (rank 1 has none of eval_iters=1): the 1-rank losses
    evals = [[(r["step"], r["train_loss"], r["val_loss"]) for r in records(o, "eval")] for o in (two_ranks, one_rank["out"])]
    assert [e[0] for e in evals[0]] == [e[0] for e in evals[1]] == list(range(0, STEPS + 1, 10))
    assert [v for e in evals[0] for v in e[1:]] == pytest.approx([v for e in evals[1] for v in e[1:]], rel=1e-5)
    # rank 0's checkpoint is a one-GPU checkpoint: the same keys as the 1-rank run's
    ck = torch.load(two_ranks / "ckpt.pt", weights_only=True)
    ref = torch.load(one_rank["out"] / "ckpt.pt", weights_only=True)
    assert sorted(ck["model"]) == sorted(ref["model"]) and ck["world_size"] == 2
    assert ck["rank_micro_batches"] == [[4], [4]] and len(ck["rng_ranks"]) == 2


def test_an_oom_on_rank_1_only_shrinks_both_ranks_and_redoes_the_step(tmp_path, one_rank):
    out = tmp_path / "out"
    res = torchrun(["run", "--preset", "tiny", *SETS, "-s", "batch_size=8", "-s", "gradient_accumulation_steps=1",
                    "--out", str(out), "--no-probe", "--no-progress", "--max-steps", "8"],
                   env(tmp_path, AUTOFIT_FAULT_OOM_AT_STEP="3@1"))
    ok(res)
    shrinks = [e for e in records(out, "event") if e["event"] == "oom_shrink"]
    assert len(shrinks) == 1 and shrinks[0]["step"] == 3 and shrinks[0]["injected"]
    assert "rank 1 ran out of memory" in shrinks[0]["reason"]  # rank 0 was told by rank 1
    assert "redoing step 3 on the same data (rank 1 ran out of memory in this step)" in res.stdout  # said whose
    assert shrinks[0]["old_micro_batch"] == 4 and shrinks[0]["new_micro_batch"] == 2
    assert shrinks[0]["effective_batch"] == 8  # the whole run's, unchanged
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 8 and ck["rank_micro_batches"] == [[2, 2], [2, 2]]  # both ranks shrank
    # every step ran once, on the same data: the losses of the unfaulted run (whose micro-batch
    # split differs only in rounding: each micro-batch's loss is weighted by its tokens)
    assert sorted(losses(out)) == list(range(8))
    assert_close(losses(out), one_rank["losses"], rel=1e-5)


def test_ranks_with_different_budgets_probe_to_one_plan_that_fits_the_smaller(tmp_path):
    e = env(tmp_path, budgets="3MiB,2MiB")
    batch = ["-s", "batch_size=16", "--checkpointing", "0", "--loss", "standard"]
    res = torchrun(["probe", "--preset", "tiny", *SETS, *batch, "--save", "--json"], e)
    ok(res)
    probe = json.loads(res.stdout)  # one JSON document: only rank 0 prints
    plan, smaller = probe["plan"], int(2 * 2**20 * 0.9)  # rank 1's budget less the 10% margin
    assert plan["world_size"] == 2 and plan["parallelism"] == "ddp"
    assert plan["budget_bytes"] == smaller and plan["measured_peak_bytes"] <= smaller
    assert sum(plan["micro_batches"]) == 16 and plan["micro_batch"] < 16  # each rank's 16 of 32
    fits = [t for t in probe["trials"] if t["status"] == "fit"]
    assert fits and all("agreed over 2 ranks" in t["note"] for t in fits)
    # the device, and the profile saved, are the smaller rank's, whose budget the plan fits (t8's M5:
    # rank 0's 3 MiB named the profile cpu-3mb and sized its memory)
    assert probe["device"]["total_bytes"] == 2 * 2**20 and probe["device"]["ranks"].startswith("rank 1's")
    assert probe["saved"]["profile"] == "cpu-2mb"
    assert "memory_bytes = 2097152" in (tmp_path / "home" / "profiles" / "cpu-2mb.toml").read_text()
    # every rank reuses the plan rank 0 saved, and trains it without an OOM, the smaller one included
    out = tmp_path / "out"
    res = torchrun(["run", "--preset", "tiny", *SETS, *batch, "--profile", probe["saved"]["profile"], "--out", str(out),
                    "--no-progress", "--max-steps", "3"], e)
    ok(res)
    run = records(out, "run")[0]["plan"]
    assert run["source"] == "profile" and run["fingerprint"] == probe["saved"]["fingerprint"]
    assert run["micro_batches"] == plan["micro_batches"]
    assert not [ev for ev in records(out, "event") if "oom" in ev["event"]]
    assert [r["step"] for r in records(out, "train")] == [0, 1, 2]
    # a budget the saved plan does not fit on one rank only: every rank probes again (t8's H1, session
    # 15: rank 0 trained the saved plan while rank 1 probed, and both broke in their next collective)
    low = int(plan["measured_peak_bytes"] / 0.9 * 0.8)
    out2 = tmp_path / "out2"
    res = torchrun(["run", "--preset", "tiny", *SETS, *batch, "--profile", probe["saved"]["profile"], "--out", str(out2),
                    "--no-progress", "--max-steps", "2"], env(tmp_path, budgets=f"3MiB,{low}"))
    ok(res)
    assert records(out2, "run")[0]["plan"]["source"] == "probe"
    assert "the saved plan does not do what this command asks" in res.stderr + res.stdout


def test_sigterm_stops_both_ranks_at_one_step_and_the_resume_matches(tmp_path, two_ranks):
    out = tmp_path / "out"
    e = env(tmp_path)
    proc = autofit_proc(["run", "--preset", "tiny", *SETS, "--out", str(out), "--no-probe", "--no-progress",
                         "--nproc-per-node", "2"], e)
    try:
        wait_for_step(out, proc, 2)
        proc.send_signal(signal.SIGTERM)  # to torchrun's agent, which passes it on to both ranks
        _, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    stopped = ck["iter_num"]
    assert 2 < stopped < STEPS and records(out, "interrupted")[0]["step"] == stopped
    res = subprocess.run([sys.executable, "-m", "autofit", "run", "--resume", "--out", str(out), "--no-progress",
                          "--nproc-per-node", "2"], env=e, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    ok(res)
    assert sorted(losses(out)) == list(range(STEPS))
    assert_close(losses(out), losses(two_ranks), rel=1e-6)


def test_a_resume_on_another_number_of_ranks_keeps_the_effective_batch(tmp_path, two_ranks, capsys):
    """Also t12's L4 and L5 (session 18): resumed on 1 rank, it said "the checkpoint's parallelism
    'ddp' shares the model among several ranks; ... unused" beside "resumed on 1 rank": now only
    the latter; and the event came before the resume's own 'run' record in metrics.jsonl."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(two_ranks, out)
    cfg = load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in
                                                 {**CONFIG, "out_dir": out, "max_iters": STEPS + 2}.items()])
    cfg.parallelism = "ddp"  # the checkpoint's, as autofit's resume gives it (a probed plan of 2 ranks sets it)
    assert cfg.source_of("parallelism") == "default"
    res = train(cfg, RunOptions(device=torch.device("cpu"), progress=False, resume=True, micro_batch=4))
    assert res.steps == STEPS + 2
    said = capsys.readouterr().out
    assert "resumed on 1 rank (the checkpoint's run had 2)" in said and "parallelism" not in said, said
    recs = records(out)
    resumed = next(i for i, r in enumerate(recs) if r["type"] == "run" and r["resumed_at"] == STEPS)
    assert [r.get("event") for r in recs[resumed + 1:] if r["type"] == "event"][0] == "world_size_changed", recs
    (change,) = [e for e in records(out, "event") if e["event"] == "world_size_changed"]
    assert (change["old_world_size"], change["new_world_size"]) == (2, 1)
    assert (change["old_rank_batch"], change["new_rank_batch"], change["effective_batch"]) == (4, 8, 8)
    assert change["old_micro_batches"] == [4] and change["micro_batches"] == [4, 4]
    assert {r["effective_batch"] for r in records(out, "train") if r["step"] >= STEPS} == {8}


def test_a_resume_on_another_number_of_ranks_that_also_changes_the_batch_says_both(tmp_path, two_ranks):
    """It said 'the effective batch stays 16; each rank's share 16 -> 16' for a batch that went 8 -> 16
    (the old share was computed from the new batch)."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(two_ranks, out)
    cfg = load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in
                                                 {**CONFIG, "out_dir": out, "max_iters": STEPS + 1,
                                                  "gradient_accumulation_steps": 4}.items()])
    train(cfg, RunOptions(device=torch.device("cpu"), progress=False, resume=True, micro_batch=4))
    (change,) = [e for e in records(out, "event") if e["event"] == "world_size_changed"]
    assert (change["old_effective_batch"], change["effective_batch"]) == (8, 16)
    assert (change["old_rank_batch"], change["new_rank_batch"]) == (4, 16)


def _child_with_rank(parent: int, rank: int) -> int:
    """The pid of `parent`'s child process whose environment says RANK=rank (Linux /proc)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(d.name)
    raise AssertionError(f"no rank {rank} under pid {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid through /proc")
def test_a_rank_killed_with_sigkill_makes_the_other_stop_with_one_line(tmp_path):
    """The survivor notices the lost connection, not the collective timeout: that is set far above
    how long the test waits, so no clock is read and a slow machine cannot fail it."""
    out = tmp_path / "out"
    e = env(tmp_path)
    e["AUTOFIT_DIST_TIMEOUT"] = "3600"
    proc = autofit_proc(["run", "--preset", "tiny", *SETS, "-s", "max_iters=100000", "--out", str(out),
                         "--no-probe", "--no-progress", "--nproc-per-node", "2"], e)
    try:
        wait_for_step(out, proc, 2)
        os.kill(_child_with_rank(proc.pid, 1), signal.SIGKILL)
        _, err = proc.communicate(timeout=LAUNCH_TIMEOUT)  # far below the 3600 s collective timeout
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL
    # issue 19: the cause, once; rank 0's 'lost contact' is its consequence, not news
    assert err.strip().splitlines() == ["autofit: rank 1 stopped with signal SIGKILL"], err


def test_fsdp2_matches_ddp_with_a_lower_peak_per_rank(tmp_path, two_ranks):
    out = tmp_path / "out"
    ok(torchrun(["run", "--preset", "tiny", *SETS, "-s", "parallelism=fsdp2", "--out", str(out), "--no-probe",
                 "--no-progress", "--max-steps", "8"], env(tmp_path, AUTOFIT_FAULT_OOM_AT_STEP="3@1")))
    assert sorted(losses(out)) == list(range(8))
    assert_close(losses(out), losses(two_ranks), rel=1e-5)
    # before the OOM both ran micro-batch 4: FSDP2's peak is lower (state sharded in two)
    peak = lambda o: max(r["peak_mem_bytes"] for r in records(o, "train") if r["step"] < 3)  # noqa: E731
    assert peak(out) < peak(two_ranks)
    # an OOM on rank 1 only, before its forward, is agreed at the first block's check-in
    (shrink,) = [e for e in records(out, "event") if e["event"] == "oom_shrink"]
    assert shrink["step"] == 3 and "rank 1" in shrink["reason"] and shrink["new_micro_batch"] == 2
    assert records(out, "run")[0]["parallelism"] == "fsdp2"
    # the checkpoint is the whole model, gathered on rank 0, that a one-GPU GPT loads as is
    from trainer.model.gpt import GPT, GPTConfig, clean_state_dict
    cfg = load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in CONFIG.items()])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    GPT(GPTConfig.from_train_config(cfg)).load_state_dict(clean_state_dict(ck["model"]))


# ------------------------------------------------------------------ in-process: the pieces


def test_an_effective_batch_that_does_not_divide_names_the_nearest_that_do(tmp_path):
    with pytest.raises(TrainError, match="does not divide among 2 ranks; the nearest that do are 8 or 10"):
        check_divisible(9, 2)
    check_divisible(8, 2)
    with pytest.raises(TrainError, match="100000 ranks need at least one sequence each per step.*at most 8 ranks"):
        check_divisible(8, 100000)  # not "the nearest that do are 100000"
    # the CLI says so before any probe or torchrun start: one line, exit 2
    res = subprocess.run([sys.executable, "-m", "autofit", "run", "--preset", "tiny", *SETS, "-s", "batch_size=3",
                          "-s", "gradient_accumulation_steps=3", "--out", str(tmp_path / "o"), "--nproc-per-node", "2"],
                         env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "the nearest that do are 8 or 10" in res.stderr and not (tmp_path / "o").exists()
    # and a --set that makes one of them: batch_size 3 divides neither, so both keys (3 x 3 -> 5 x 2)
    assert "(e.g. --set batch_size=5 --set gradient_accumulation_steps=2)" in res.stderr
    with pytest.raises(TrainError, match=r"16 or 18 \(e\.g\. --set gradient_accumulation_steps=4\)"):
        check_divisible(17, 2, batch_size=4, grad_accum=5)  # 4 divides 16, not 18: the accumulation alone


def test_each_rank_reads_its_own_rows_of_the_same_step_batch():
    from trainer.data.datasets import BatchSampler, load_dataset
    s = BatchSampler(load_dataset("embedded"), 16, seed=3)
    x, y = s.batch_at("train", 6, counter=5)
    parts = [s.batch_at("train", 6, 5, rows=Ranks(r, r, 3).rows(6)) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_the_fault_selector_names_one_rank(monkeypatch):
    monkeypatch.setenv("AUTOFIT_FAULT_OOM_AT_STEP", "3@1")
    assert FaultInjector.from_env(rank=0).at_step is None and FaultInjector.from_env(rank=1).at_step == 3
    monkeypatch.setenv("AUTOFIT_FAULT_OOM_AT_STEP", "3")
    assert FaultInjector.from_env(rank=0).at_step == 3 and FaultInjector.from_env(rank=1).at_step == 3
    assert FaultInjector.from_env(rank=1, world_size=2).at_step == 3
    monkeypatch.setenv("AUTOFIT_FAULT_OOM_AT_STEP", "3@2")  # ranks 0 and 1 only: it would never fire
    with pytest.raises(ValueError, match=r"names rank 2, but this run has 2 ranks, 0 to 1"):
        FaultInjector.from_env(rank=0, world_size=2)
    monkeypatch.setenv("AUTOFIT_FAULT_OOM_AT_STEP", "3@one")
    with pytest.raises(ValueError, match=r"STEP@RANK"):
        FaultInjector.from_env()


def _two_ranks_gathering(monkeypatch, rank1_value):
    """agree's collectives on a pretend rank 0 of 2: rank 1 contributes `rank1_value`."""
    monkeypatch.setattr(agree, "ranks", lambda: Ranks(0, 0, 2))
    monkeypatch.setattr(agree.D, "all_gather_objects", lambda obj, r: [obj, rank1_value(obj)])


def test_a_trial_fits_only_where_it_fits_on_every_rank(monkeypatch):
    mine = TrialRecord(micro_batch=8, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                       status="fit", measured_peak_bytes=1000, tokens_per_s=500.0, step_seconds=[0.1])
    slower = mine.model_copy(update={"measured_peak_bytes": 1200, "tokens_per_s": 300.0, "step_seconds": [0.2]})
    _two_ranks_gathering(monkeypatch, lambda d: slower.model_dump())
    got = agree.trial(mine)
    assert got.status == "fit" and got.measured_peak_bytes == 1200 and got.tokens_per_s == 300.0
    assert "agreed over 2 ranks" in got.note
    failed = slower.model_copy(update={"status": "oom", "tokens_per_s": None, "note": "out of memory"})
    _two_ranks_gathering(monkeypatch, lambda d: failed.model_dump())
    got = agree.trial(mine)
    assert got.status == "oom" and "rank 1 oom" in got.note


def test_a_trial_that_ran_out_on_rank_1_names_rank_1_not_the_rank_that_met_it(monkeypatch):
    """Rank 0 met rank 1's OOM (OtherRankOOM, from its settle or a check-in): both records say
    'oom', and the merged one named the first, 'rank 0 oom', with rank 0's note. Now the rank that
    ran out, with its allocator's words; a rank that failed itself outranks one that met it."""
    mine = TrialRecord(micro_batch=8, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                       status="oom", note="OtherRankOOM: rank 1 ran out of memory in this step", met_other_rank=True)
    own = mine.model_copy(update={"note": "OutOfMemoryError: budgeted CPU device out of memory: tried to allocate 4 B",
                                  "met_other_rank": False})
    _two_ranks_gathering(monkeypatch, lambda d: own.model_dump())
    got = agree.trial(mine)
    assert got.status == "oom" and got.note.startswith(f"{own.note}; agreed over 2 ranks: rank 1 oom;")
    worse = mine.model_copy(update={"status": "error", "note": "RuntimeError: boom"})  # the worst status still wins
    _two_ranks_gathering(monkeypatch, lambda d: worse.model_dump())
    assert agree.trial(own).note.startswith("RuntimeError: boom; agreed over 2 ranks: rank 1 error;")


def test_the_rank_that_met_another_ranks_failure_is_told_by_the_record_not_its_notes_wording(monkeypatch):
    """agree.trial read 'met another rank's failure' from the note's opening words ('OtherRankOOM:',
    'RankFailed:'): any other wording of the note named the rank that only met the failure. Now the
    record's met_other_rank says it, whatever the note's words; records without it are a rank's own."""
    base = TrialRecord(micro_batch=8, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                       status="error")
    met = base.model_copy(update={"note": "stopped: rank 1 failed", "met_other_rank": True})
    own = base.model_copy(update={"note": "RankFailed: a note worded like a consequence, but this rank's own"})
    _two_ranks_gathering(monkeypatch, lambda d: own.model_dump())
    assert agree.trial(met).note.startswith(f"{own.note}; agreed over 2 ranks: rank 1 error;")
    _two_ranks_gathering(monkeypatch, lambda d: met.model_dump())
    assert agree.trial(own).note.startswith(f"{own.note}; agreed over 2 ranks: rank 0 error;")
    old = {k: v for k, v in met.model_dump(mode="json").items() if k != "met_other_rank"}  # a record from before
    assert TrialRecord.model_validate_json(json.dumps(old)).met_other_rank is False


def test_the_search_space_is_what_every_rank_can_run(monkeypatch):
    from autofit.planning.candidates import PlanError, Space
    mine = Space(dtypes=["bfloat16", "float32"], compile=[False, True], checkpointing=[0, 1],
                 loss_impls=["standard", "chunked"])
    old_card = Space(dtypes=["float16", "float32"], compile=[False], checkpointing=[0, 1], loss_impls=["standard"])
    _two_ranks_gathering(monkeypatch, lambda s: old_card)
    got = agree.space(mine)
    assert (got.dtypes, got.compile, got.loss_impls) == (["float32"], [False], ["standard"])
    _two_ranks_gathering(monkeypatch, lambda s: Space(["float16"], [False], [0], ["standard"]))
    with pytest.raises(PlanError, match="no dtypes in common"):
        agree.space(mine)


def test_the_device_named_is_the_smallest_budgets_rank_and_the_line_says_both(monkeypatch):
    from autofit.devices.cpu import cpu_info
    from autofit.launch.run import hardware_dict_for, profile_name_for
    from autofit.planning.budget import compute_budget
    mine, smaller = cpu_info(64 * 2**20), cpu_info(48 * 2**20)
    own = compute_budget(mine)
    _two_ranks_gathering(monkeypatch, lambda obj: (compute_budget(smaller), smaller))
    got = agree.bind(own, mine)
    assert got.device.total_bytes == 48 * 2**20 and profile_name_for(got.device) == "cpu-48mb"
    assert hardware_dict_for(got.device, "cpu-48mb")["memory_bytes"] == 48 * 2**20
    assert got.words == "rank 1's, the smallest budget of 2 ranks (rank 0's: 64.0 MiB total, 64.0 MiB free)"
    assert got.own is own and got.budget.budget_bytes == compute_budget(smaller).budget_bytes
    assert "smallest of 2 ranks' budgets (rank 1)" in got.budget.terms[-1].how
    _two_ranks_gathering(monkeypatch, lambda obj: (compute_budget(cpu_info(64 * 2**20)), cpu_info(64 * 2**20)))
    got = agree.bind(own, mine)  # equal: rank 0's, as budget()
    assert got.device is mine and got.words == "rank 0's, the smallest budget of 2 ranks"
    monkeypatch.setattr(agree, "ranks", lambda: Ranks())
    assert agree.bind(own, mine) == agree.Binding(own, own, mine, "")  # one process: no collective, no words


def test_the_probes_device_line_names_the_ranks_device():
    from types import SimpleNamespace
    from autofit.devices.cpu import cpu_info
    from autofit.report.render import device_line
    res = SimpleNamespace(device=cpu_info(48 * 2**20), device_ranks="rank 1's, the smallest budget of 2 ranks")
    line = device_line(res)
    assert line.startswith("device: ") and "(cpu, 48.0 MiB total, 48.0 MiB free;" in line
    assert line.endswith("), rank 1's, the smallest budget of 2 ranks")
    assert device_line(SimpleNamespace(device=res.device, device_ranks="")).endswith(")")  # one process: as before


def test_plans_are_keyed_by_world_size_and_parallelism(monkeypatch):
    from autofit.launch.run import plan_fingerprint_inputs
    from autofit.devices.cpu import cpu_info
    cfg = load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in CONFIG.items()])
    one = plan_fingerprint_inputs(cfg, cpu_info(2**30))
    assert "world_size" not in one  # one-GPU plans keep their fingerprints
    monkeypatch.setattr(agree, "ranks", lambda: Ranks(0, 0, 2))
    two = plan_fingerprint_inputs(cfg, cpu_info(2**30))
    assert two["world_size"] == 2 and two["parallelism"] == "auto"  # what the config asks for


def test_each_rank_gets_its_own_cpu_budget(monkeypatch):
    from autofit.devices.device import DeviceError
    from autofit.devices.ranks import rank_budget
    from autofit.launch.launcher import strip_nproc
    monkeypatch.setenv("AUTOFIT_RANK_BUDGETS", "3MiB,2MiB")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rank_budget(None) == 2 * 2**20
    monkeypatch.setenv("AUTOFIT_RANK_BUDGETS", "3MiB")
    with pytest.raises(DeviceError, match="names 1 budget"):
        rank_budget(None)
    assert strip_nproc(["run", "--nproc-per-node", "2", "-s", "a=1", "--nproc-per-node=3"]) == ["run", "-s", "a=1"]


def test_ranks_on_one_machine_share_the_default_cpu_budget(monkeypatch):
    import autofit.devices.cpu
    from autofit.devices.device import DeviceError
    from autofit.devices.ranks import cpu_share
    from autofit.launch.torchrun import check_ranks
    monkeypatch.setattr(autofit.devices.cpu, "default_cpu_budget", lambda: 8 * 2**30)
    assert cpu_share(None) is None and cpu_share(123) == 123  # one process: the device's own default
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpu_share(None) == 2 * 2**30  # four ranks take their budgets at once
    cfg = load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in CONFIG.items()])
    with pytest.raises(DeviceError, match="already one of torchrun's ranks"):
        check_ranks(cfg, 2, resume=False)


def forward_oom_runs(tmp_path: Path, parallelism: str, mode: str) -> tuple[list[dict], list[dict]]:
    """tests/ranks/forward_oom_worker.py on 2 ranks, without and with rank 1's OOM inside block
    1's forward: each rank's record of both runs."""
    worker = str(Path(__file__).parent / "ranks" / "forward_oom_worker.py")
    runs = []
    for fault in ("none", "oom"):
        out = tmp_path / fault
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               worker, parallelism, fault, str(out), mode]
        done = subprocess.run(cmd, env=env(tmp_path, PYTHONPATH=str(Path(__file__).parents[1])),
                              capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append([json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)])
    return runs[0], runs[1]


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp2"])
def test_an_eval_oom_on_rank_1_halves_both_ranks_eval_micro_batch(tmp_path, parallelism):
    """Rank 1 runs out of memory inside block 1's forward of its first eval batch (under FSDP2
    rank 0 then waits in the forward's closing check-in): both ranks halve, redo the batch and
    report the losses of an evaluation that never ran out of memory; no hang (timeouts)."""
    clean, faulted = forward_oom_runs(tmp_path, parallelism, "eval")
    assert [r["micro_batch"] for r in clean] == [8, 8]
    assert [r["micro_batch"] for r in faulted] == [4, 4]
    # each record says whose OOM it was, as a step's shrink does: rank 0's names rank 1 (under
    # FSDP2 met in a check-in of its own forward), rank 1's quotes its own error
    assert [r["events"] for r in faulted] == [
        [["eval_oom_shrink", {"eval_micro_batch": 4, "reason": "rank 1 ran out of memory in this evaluation batch",
                              "oom_rank": 1}]],
        [["eval_oom_shrink", {"eval_micro_batch": 4, "reason": "CUDA out of memory (injected in block 1)"}]]]
    for got, want in zip(faulted, clean):
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)


def test_an_fsdp2_oom_inside_rank_1s_forward_shrinks_both_ranks_and_redoes_the_step(tmp_path):
    """Mid-forward (block 1, the last block) at step 3 on rank 1 only, under FSDP2: both ranks
    shrink 2 -> 1, redo step 3 and match the unfaulted run's losses (FSDP2's iteration state is
    reset, so the redo's all-gathers pair up)."""
    clean, faulted = forward_oom_runs(tmp_path, "fsdp2", "train")
    assert [r["events"] for r in faulted] == [[["oom_shrink", 3]]] * 2
    assert [r["micro_batch"] for r in faulted] == [1, 1] and [r["micro_batch"] for r in clean] == [2, 2]
    for got, want in zip(faulted, clean):
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    # rank 0 met it in a check-in of its own forward: its record names rank 1, rank 1's its own words
    assert [r["whose"] for r in faulted] == [[["rank 1 ran out of memory in this step", 1]],
                                             [["injected out of memory at oom", None]]]


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp2"])
def test_another_ranks_oom_is_recorded_as_that_ranks_on_every_rank(tmp_path, parallelism):
    """Rank 0 runs out of memory inside block 1's forward at step 3; rank 1 learns of it in a
    check-in of its own forward (FSDP2) or in the step's settle (DDP). Under FSDP2 rank 1 entered
    it in the agreement as an OOM of its own, so the agreement named rank 1, the highest 'failed'
    rank: the record must name rank 0 on both ranks, as DDP's does (rank 0 with its own words)."""
    worker = str(Path(__file__).parent / "ranks" / "forward_oom_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           worker, parallelism, "oom/rank0", str(tmp_path), "train"]
    done = subprocess.run(cmd, env=env(tmp_path, PYTHONPATH=str(Path(__file__).parents[1])),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["events"] for r in got] == [[["oom_shrink", 3]]] * 2 and [r["micro_batch"] for r in got] == [1, 1]
    assert [r["whose"] for r in got] == [[["injected out of memory at oom", None]],
                                         [["rank 0 ran out of memory in this step", 0]]]


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp2"])
def test_a_trial_that_met_another_ranks_error_records_an_error_with_that_ranks_line(tmp_path, parallelism):
    """Rank 1's trial step raises a RuntimeError. Rank 0 learns of it in the step's settle (DDP) or in
    a check-in of its own step (FSDP2). Under FSDP2 rank 0's record said 'oom' (OtherRankOOM: 'rank 1
    failed in this step') for what was rank 1's error. Under both, its note said '(its own error says
    why)' without rank 1's line, which rank 1 never told the agreement. Rank 0 now records an error,
    met, with rank 1's first line, and the agreed record is rank 1's own."""
    worker = str(Path(__file__).parent / "ranks" / "trial_error_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           worker, parallelism, str(tmp_path)]
    done = subprocess.run(cmd, env=env(tmp_path, PYTHONPATH=str(Path(__file__).parents[1])),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["status"], r["met"]) for r in got] == [("error", True), ("error", False)]
    assert got[0]["note"] == ("RankFailed: rank 0: rank 1 failed in this step (its own error says why); "
                              "stopping here too (rank 1: kernel exploded on rank 1)")
    assert got[1]["note"] == "RuntimeError: kernel exploded on rank 1"
    for r in got:
        assert r["agreed_status"] == "error"
        assert r["agreed_note"].startswith("RuntimeError: kernel exploded on rank 1; agreed over 2 ranks: rank 1 error")


EXIT_PROBE = """
import atexit, sys
from trainer.distributed.ranks import exit_rank
atexit.register(lambda: print("teardown"))
print("said", end="")  # block-buffered into a pipe: only a flush gets it out
exit_rank(5)
"""


@pytest.mark.parametrize("world_size, teardown", [("2", False), ("1", True)])
def test_a_rank_exits_with_its_code_and_its_output_but_without_the_interpreters_teardown(world_size, teardown):
    """exit_rank: one of several ranks flushes and leaves by os._exit (no atexit handler, no
    teardown for a gloo thread to abort); one process exits as sys.exit does."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    e.update(WORLD_SIZE=world_size, RANK="1" if world_size == "2" else "0",
             PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-c", EXIT_PROBE], env=e, capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr
    assert done.stdout == ("saidteardown\n" if teardown else "said")


def test_python_m_autofit_hands_main_s_exit_status_to_exit_rank(monkeypatch):
    """`python -m autofit` (what torchrun starts) ends every way main() can end through exit_rank:
    a status, a bare exit, a message (printed, status 1)."""
    import autofit.__main__ as entry
    import autofit.cli.app
    import trainer.distributed.ranks
    codes = []
    monkeypatch.setattr(trainer.distributed.ranks, "exit_rank", codes.append)
    for how in (lambda: None, lambda: sys.exit(2), lambda: sys.exit(None), lambda: sys.exit("bad input")):
        monkeypatch.setattr(autofit.cli.app, "main", how)
        entry.run()
    assert codes == [0, 2, 0, 1]


def test_a_resume_on_another_number_of_ranks_gives_each_rank_its_own_rng():
    """Three ranks' RNG states in the checkpoint, two ranks now: rank 0 takes rank 0's, rank 1 a
    state seeded from it plus its rank (it took rank 0's too: the same dropout masks on every
    rank), the same on every resume."""
    from types import SimpleNamespace
    from trainer.distributed.multirank import RankGroup
    states = [torch.Generator().manual_seed(s).get_state() for s in (1, 2, 3)]
    ck = {"rng_ranks": states, "rng_cpu": states[0], "rng_cuda": None}

    def state(rank):
        return RankGroup.rng_state(SimpleNamespace(ranks=SimpleNamespace(world_size=2, rank=rank)), ck)[0]
    assert torch.equal(state(0), states[0])
    assert not torch.equal(state(1), states[0]) and torch.equal(state(1), state(1))
    draws = []
    for rank in (0, 1):
        g = torch.Generator()
        g.set_state(state(rank))
        draws.append(torch.rand(4, generator=g))
    assert not torch.equal(draws[0], draws[1])


def test_a_ddp_trial_measures_the_peak_training_has(tmp_path):
    """The probe's trial under DDP primes its optimizer as training does (gradients dropped, then
    made as views of DDP's buckets): its measured peak is that of the training steps of the same
    micro-batch, not one parameter-sized gradient copy more."""
    out = tmp_path / "out"
    ok(torchrun(["run", "--preset", "tiny", *SETS, "-s", "max_iters=3", "--checkpointing", "0", "--loss", "standard",
                 "--out", str(out), "--no-progress"], env(tmp_path)))
    plan = records(out, "run")[0]["plan"]
    steps = [r for r in records(out, "train") if r["micro_batch"] == plan["micro_batch"]]
    assert steps, "no training step ran the plan's micro-batch"
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    param_bytes = 4 * sum(v.numel() for v in ck["model"].values())
    # the least of the steps' peaks: under load a step once read 0.8 of a parameter copy more
    # (1,639,024 B against 1,503,216 B in every step of four quiet runs: a fresh-clone CI run,
    # session 13; not explained, perhaps a gloo all-reduce buffer held longer), which is not the
    # trial's priming this test is about; a trial one gradient copy above training still fails it
    trained = min(r["peak_mem_bytes"] for r in steps)
    assert abs(plan["measured_peak_bytes"] - trained) < param_bytes / 2, (plan["measured_peak_bytes"],
                                                                         [r["peak_mem_bytes"] for r in steps],
                                                                         param_bytes)


def test_muon_over_fused_matrices_trains_two_ranks_as_one(tmp_path):
    """Muon takes c_attn and SwiGLU's c_fc block by block through views of the fused parameters;
    under DDP their gradients are views of its buckets, linked before the update: two ranks train
    the losses of one."""
    over = {**CONFIG, "optimizer": "muon", "mlp": "swiglu", "max_iters": 6, "eval_interval": 100}
    sets = [a for k, v in over.items() for a in ("-s", f"{k}={v}")]
    ok(torchrun(["run", "--preset", "tiny", *sets, "--out", str(tmp_path / "two"), "--no-probe", "--no-progress"],
                env(tmp_path)))
    cfg = load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in {**over, "out_dir": tmp_path / "one"}.items()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, RunOptions(device=torch.device("cpu"), progress=False))
    finally:
        torch.set_num_threads(threads)
    assert sorted(losses(tmp_path / "two")) == list(range(6))
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rel=1e-5)


def test_rank_budgets_on_one_process_are_refused_and_named_as_set(monkeypatch):
    """AUTOFIT_RANK_BUDGETS left exported took over --budget on one process, in silence; under
    torchrun a size past the machine's memory was reported as '--budget: ...'."""
    from autofit.devices.cpu import machine_memory_bytes
    from autofit.devices.device import DeviceError
    from autofit.devices.opener import open_device
    from autofit.devices.ranks import rank_budget
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("AUTOFIT_RANK_BUDGETS", "3MiB")
    with pytest.raises(DeviceError, match="gives each of several torchrun ranks its own CPU budget, and this is one "
                                          "process: unset it"):
        rank_budget(64 * 2**20)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    too_much = 4 * (machine_memory_bytes() or 2**40)
    monkeypatch.setenv("AUTOFIT_RANK_BUDGETS", f"3MiB,{too_much}")
    with pytest.raises(DeviceError, match=r"^AUTOFIT_RANK_BUDGETS: .* is more than this machine's memory"):
        open_device("cpu", budget_bytes=None)


def test_one_sequence_for_two_ranks_says_one_rank():
    """'use at most 1 ranks'."""
    from trainer.distributed.shares import check_divisible
    from trainer.errors import TrainError
    with pytest.raises(TrainError, match=r"use at most 1 rank, or an effective batch that 2 divides"):
        check_divisible(1, 2, 1, 1)
    with pytest.raises(TrainError, match=r"use at most 3 ranks, or"):
        check_divisible(3, 4, 3, 1)


def test_the_oom_line_names_the_rank_that_ran_out_on_several_ranks():
    """The stdout line of an agreed OOM did not say which rank ran out (only metrics.jsonl did)."""
    from trainer.metrics import describe_event
    ev = dict(event="oom_shrink", step=3, old_micro_batch=4, new_micro_batch=2, effective_batch=8)
    other = describe_event({**ev, "reason": "rank 1 ran out of memory in this step"})
    assert other.endswith("redoing step 3 on the same data (rank 1 ran out of memory in this step)")
    own = describe_event({**ev, "reason": "budgeted CPU device out of memory: tried to allocate 16.0 KiB"})
    assert own.endswith("redoing step 3 on the same data")
    # an evaluation's shrink names the rank as a step's does (it did not: no reason was recorded)
    evs = dict(event="eval_oom_shrink", step=4, eval_micro_batch=2)
    other = describe_event({**evs, "reason": "rank 1 ran out of memory in this evaluation batch", "oom_rank": 1})
    assert other == ("out of memory in evaluation: eval micro-batch now 2, training plan unchanged; redoing the batch "
                     "(rank 1 ran out of memory in this evaluation batch)")
    own = describe_event({**evs, "reason": "budgeted CPU device out of memory: tried to allocate 16.0 KiB"})
    assert own.endswith("redoing the batch") and describe_event(evs) == own  # an older record: no reason


def test_ddps_first_step_holds_no_gradient_copy_beside_the_buckets(tmp_path):
    """After the optimizer state was made (gradients dropped), step 0's no_sync micro-batch made
    each .grad a tensor of its own beside DDP's buckets until the synced backward: step 0 peaked a
    gradient copy above every later step (and every probe trial with it, 8.8 % over the estimate).
    Now the reducer is rebuilt around zero gradients, which it makes bucket views."""
    # equal up to a few scalars (a 4-byte float once differed under load, session 12): a gradient
    # copy is the model's gradients, ~135 KiB here, 30x this allowance. Under heavy load step 0
    # has twice (session 13, fresh-clone CI runs beside another job) read ~133 KiB more, never on a
    # quiet machine: not explained (a gloo buffer held longer? an intermittent copy?), noted for a
    # GPU session; one more run, so that a copy made every time still fails here
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        ok(torchrun(["run", "--preset", "tiny", *SETS, "-s", "batch_size=4", "-s", "gradient_accumulation_steps=4",
                     "-s", "log_interval=1", "--out", str(out), "--no-probe", "--no-progress", "--max-steps", "3"],
                    env(tmp_path)))
        peaks = [r["peak_mem_bytes"] for r in records(out, "train")]
        assert len(peaks) == 3, peaks
        if max(peaks) - min(peaks) <= 4096:
            break
    assert max(peaks) - min(peaks) <= 4096, peaks


def test_ranks_that_read_other_data_are_refused_before_training(monkeypatch):
    """r4 (session 15): each rank opens its own copy of the dataset (each node's disk); a copy of
    other text or length gave its ranks other sequences than rank 0 drew, silently."""
    from trainer.data.datasets import load_dataset
    from trainer.data.tokenfiles import fingerprint
    from trainer.distributed import multirank
    data = load_dataset("embedded")
    mine = {s: fingerprint(data.split(s).parts) for s in data.splits}
    gathered = []
    monkeypatch.setattr(multirank.D, "all_gather_objects", lambda obj, r: gathered.append(obj) or [obj, rank1])
    rank1 = {**mine, "train": {**mine["train"], "tokens": mine["train"]["tokens"] - 1}}
    with pytest.raises(TrainError, match=r"^rank 0: rank 1 reads other data than rank 0 \(train: [\d,]+ -> [\d,]+ "
                                         r"tokens\); every rank must read the same dataset"):
        multirank.same_data(data, Ranks(0, 0, 2))
    assert gathered == [mine]
    rank1 = dict(mine)
    multirank.same_data(data, Ranks(0, 0, 2))  # the same data: nothing said
    multirank.same_data(data, Ranks(0, 0, 1))  # one process: no collective
    assert len(gathered) == 2
