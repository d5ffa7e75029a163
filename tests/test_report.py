"""What the probe's report and `profiles show` print for plans on several ranks and for trials
that did not fit: each figure is that of the plan that runs, per rank where it is one rank's."""
from types import SimpleNamespace

import pytest

from autofit.records import PlanRecord, TrialRecord
from trainer.config.train_config import load_config


def two_rank_plan(**kw) -> PlanRecord:
    """16 x 2 on each of 4 ranks: an effective batch of 128 written as 16 x 8."""
    base = dict(mode="measured", micro_batch=16, grad_accum=2, micro_batches=[16, 16], effective_batch=32,
                block_size=64, dtype="float32", compile=False, compile_after=0, checkpointing=0,
                loss_impl="standard", measured_peak_bytes=10**8, tokens_per_s=1000.0, budget_bytes=2 * 10**8,
                split="32 = 2 × 16", world_size=4, parallelism="ddp")
    return PlanRecord(**{**base, **kw})


def cfg_of(*over):
    return load_config(preset="tiny", overrides=["n_layer=2", "n_embd=32", "n_head=2", "block_size=64",
                                                 "batch_size=16", "gradient_accumulation_steps=8", *over])


def test_a_several_rank_plan_written_as_the_config_says_names_the_whole_accumulation():
    from autofit.report.render import plan_changes
    res = SimpleNamespace(device=SimpleNamespace(kind="cpu", bf16_supported=False))
    words = plan_changes(two_rank_plan(), cfg_of(), res)
    # t2 (session 11): "(1 on each of 2 ranks)" did not say what the 1 counted
    assert ("runs your 16 x 8 as written: each of the 4 ranks runs 2 micro-batches of 16 per optimizer step "
            "(16 x 2 per rank)") in words
    # t5 (session 14): '8 x 2 as written (1 micro-batch(es) of 8 on each of 2 ranks)', where each rank runs 8 x 1
    one = two_rank_plan(world_size=2, micro_batch=8, grad_accum=1, micro_batches=[8], effective_batch=8,
                        split="8 = 1 × 8")
    words = plan_changes(one, cfg_of("batch_size=8", "gradient_accumulation_steps=2"), res)
    assert ("runs your 8 x 2 as written: each of the 2 ranks runs 1 micro-batch of 8 per optimizer step "
            "(8 x 1 per rank)") in words
    assert not any("(es)" in w or "(s)" in w for w in words)
    words = plan_changes(two_rank_plan(world_size=1, checkpointing=1), cfg_of(), res)
    assert any(w.startswith("recomputes activations in backward every block (full") for w in words)


def test_a_several_rank_plans_tokens_per_s_says_per_rank(monkeypatch):
    import io
    from rich.console import Console
    from autofit.report import render
    out = io.StringIO()
    res = SimpleNamespace(plan=two_rank_plan(), mode="measured")
    render._plan(res, None, Console(file=out, width=300), verbose=False)
    assert "1,000 tokens/s per rank, ~4,000 for the 4 ranks" in out.getvalue()


@pytest.mark.parametrize("status", ["error", "leak"])
def test_the_config_as_written_that_ran_and_failed_is_not_called_an_estimated_fit(status):
    from autofit.report.render import as_written_verdict
    cfg = cfg_of("gradient_accumulation_steps=2")
    trial = TrialRecord(micro_batch=16, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                        status=status, measured_peak_bytes=10**6, note="RuntimeError: something broke")
    res = SimpleNamespace(mode="measured", trials=[trial], budget=SimpleNamespace(budget_bytes=10**9),
                          device=SimpleNamespace(kind="cpu", bf16_supported=False), plan=two_rank_plan(world_size=1))
    verdict = as_written_verdict(res, cfg)
    assert verdict.startswith(f"its trial ran and is not a fit: {status} (RuntimeError: something broke)")
    assert "estimated" not in verdict


def test_profiles_show_gives_the_whole_batch_and_tokens_per_s_per_rank():
    from autofit.cli.profiles import _plan_row
    fitted = SimpleNamespace(config_summary={"n_layer": 2}, plan=two_rank_plan(measured_reserved_bytes=15 * 10**7),
                             safe_micro_batch=None, compile_failed=False, events=[], trials=[],
                             updated=__import__("datetime").datetime(2026, 12, 4))
    row = _plan_row("fp", fitted)
    assert row[1].endswith("batch 128")  # 32 on each of 4 ranks
    assert "1,000 per rank (measured)" in row
    assert any("reserved" in cell for cell in row)


def test_estimated_recompute_counts_the_blocks_checkpointed():
    """Blocks 0, k, 2k, ... are checkpointed: with 4 layers, every 2nd and every 3rd block both
    recompute 2 of 4, so they are estimated alike."""
    from autofit.planning.estimate import ModelShape
    from autofit.planning.throughput import estimated_tokens_per_s
    shape = ModelShape.from_config(cfg_of("n_layer=4"))
    hw = SimpleNamespace(peak_bf16_tflops=0.01, peak_fp16_tflops=0.01)  # slow: the compute floor binds
    k2, k3, k4 = (estimated_tokens_per_s(shape, 8, "bfloat16", k, hw) for k in (2, 3, 4))
    assert k2 == pytest.approx(k3) and k4 > k3


def test_estimated_fp32_is_priced_at_tf32_where_the_card_and_config_have_it():
    """fp32 matmuls run on TF32 tensor cores on compute capability 8.0+ with the config's tf32
    (the default): half the fp16 rate there, a quarter without TF32 or on an older card."""
    from autofit.planning.estimate import ModelShape
    from autofit.planning.throughput import estimated_tokens_per_s
    shape = ModelShape.from_config(cfg_of())
    # figures / 10,000: so slow that the compute floor binds, not the host floor (test_throughput.py)
    ampere = SimpleNamespace(peak_bf16_tflops=0.0312, peak_fp16_tflops=0.0312, compute_capability=(8, 0))
    volta = SimpleNamespace(peak_bf16_tflops=None, peak_fp16_tflops=0.0125, compute_capability=(7, 0))
    fp16 = estimated_tokens_per_s(shape, 8, "float16", 0, ampere)
    assert estimated_tokens_per_s(shape, 8, "float32", 0, ampere) == pytest.approx(fp16 / 2)
    assert estimated_tokens_per_s(shape, 8, "float32", 0, ampere, tf32=False) == pytest.approx(fp16 / 4)
    old = estimated_tokens_per_s(shape, 8, "float16", 0, volta)
    assert estimated_tokens_per_s(shape, 8, "float32", 0, volta) == pytest.approx(old / 4)


@pytest.mark.parametrize("over, lookups", [((), lambda c: c.block_size * c.n_embd),  # GPT-2: positions
                                           (("pos_emb=rope", "tie_embeddings=False"),  # nanochat-style
                                            lambda c: c.vocab_size * c.n_embd)])
def test_estimated_flops_leave_out_the_tables_that_are_looked_up(over, lookups):
    """6N counts weights that multiply every token: not the position table, nor an input
    embedding untied from the head (nanoGPT's estimate_mfu leaves out the positions too)."""
    from autofit.planning.estimate import ModelShape, param_count
    from autofit.planning.throughput import flops_per_token
    cfg = cfg_of(*over)
    shape = ModelShape.from_config(cfg)
    attn = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert flops_per_token(shape) == 6 * (param_count(shape) - lookups(cfg)) + attn


@pytest.mark.parametrize("peak", [85 * 2**20 + 12345, int(1.2 * 2**30), 3 * 2**30])
def test_a_training_line_gives_peak_memory_as_the_plan_does(peak):
    """The plan says 'measured peak 1.20 GiB'; the training lines said '1,228.8 MiB' for it."""
    from autofit.units import fmt_bytes
    from trainer.metrics import describe_step
    rec = dict(step=1, loss=1.0, lr=1e-3, step_s=0.1, tokens_per_s=10.0, micro_batch=2, grad_accum=3,
               peak_mem_bytes=peak)
    assert describe_step(rec).endswith(f", peak {fmt_bytes(peak)}")


def test_an_uneven_split_is_not_called_m_x_n():
    """'micro-batch 4 x 2 (7 = 4 × 1 + 3)' read as 8 sequences; the step lines said the same."""
    from trainer.metrics import describe_step, micro_batch_words
    assert micro_batch_words([16, 16], 16, 2) == "micro-batch 16 x 2"
    assert micro_batch_words([4, 3], 4, 2) == "micro-batches of 4 and 3, 2 a step"
    assert micro_batch_words(None, 8, 4) == "micro-batch 8 x 4"
    line = describe_step({"step": 3, "loss": 1.0, "lr": 1e-3, "step_s": 0.05, "tokens_per_s": 1000.0,
                          "micro_batch": 31, "grad_accum": 17, "micro_batches": [31] * 2 + [30] * 15})
    assert line.endswith("tok/s, micro-batches of 31 and 30, 17 a step")


def _probe_of(plan, trials):
    return SimpleNamespace(plan=plan, mode="measured", trials=trials, effective_batch=plan.effective_batch,
                           block_size=plan.block_size, notes=[],
                           device=SimpleNamespace(kind="cpu", bf16_supported=False))


def test_the_chosen_rows_tokens_per_s_is_the_plans_and_an_unrun_size_is_named():
    """-v's table shows each trial's run figure (its update paid once per optimizer step), so the
    `>` row reads what the plan line reads; an uneven split's size that no trial ran is named."""
    import io
    from rich.console import Console
    from autofit.planning.contest import run_tokens_per_s
    from autofit.report import render, tables
    t = TrialRecord(micro_batch=11, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                    status="fit", tokens_per_step=1408, step_seconds=[0.5], update_seconds=[0.2],
                    optimizer_step_tokens=4096, tokens_per_s=1408 / 0.5, measured_peak_bytes=10**6)
    run = run_tokens_per_s(t)
    assert round(run) != round(t.tokens_per_s)  # a trial of 2 x 11 pays the update per 22, the run per 64
    plan = two_rank_plan(world_size=1, micro_batch=11, grad_accum=3, micro_batches=[11, 11, 10],
                         split="32 = 11 + 11 + 10", tokens_per_s=run, fastest_tokens_per_s=run, timed_steps=1)
    out = io.StringIO()
    console = Console(file=out, width=400)
    tables.candidates_table(_probe_of(plan, [t]), console)
    render._plan(_probe_of(plan, [t]), None, console, verbose=False)
    text = out.getvalue()
    row = next(line for line in text.splitlines() if "│ >" in line)
    assert f"{run:,.0f}" in row and f"{t.tokens_per_s:,.0f}" not in text
    assert f"fastest step {run:,.0f} tokens/s (measured" in text
    assert "micro-batch 10 not run: timed at the nearest run size's rate" in text


def test_the_plans_tokens_per_s_is_its_sizes_median_step_with_the_fastest_beside_it():
    """t5's L2 (session 14): the plan printed its fastest trial step (3,233 tokens/s) while the run
    did 1.8-2.1k. Its tokens/s is now the median of its own size's timed steps, as the run should
    see it, the fastest beside it, each labelled; both of the plan's size, never another's."""
    import io
    from rich.console import Console
    from autofit.planning.split import plan_rates
    from autofit.report import render
    steps = [1.0, 0.5, 0.9, 0.8, 2.0]  # the fastest 0.5 s, the median 0.9 s, for 1,000 tokens
    t = TrialRecord(micro_batch=8, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                    status="fit", tokens_per_step=1000, step_seconds=steps, tokens_per_s=2000.0,
                    measured_peak_bytes=10**6)
    other = t.model_copy(update={"micro_batch": 4, "step_seconds": [0.01], "tokens_per_step": 500})
    rates = plan_rates([8, 8], 10, [t, other])
    assert rates["tokens_per_s"] == pytest.approx(1000 / 0.9)
    assert rates["fastest_tokens_per_s"] == pytest.approx(2000.0)
    assert rates["timed_steps"] == 5
    assert plan_rates([8, 8], 10, []) == {"tokens_per_s": None, "fastest_tokens_per_s": None, "timed_steps": None}
    plan = two_rank_plan(world_size=1, micro_batch=8, grad_accum=2, micro_batches=[8, 8], effective_batch=16, split="16 = 2 × 8", **rates)
    out = io.StringIO()
    render._plan(_probe_of(plan, [t, other]), None, Console(file=out, width=400), verbose=False)
    text = out.getvalue()
    assert ("1,111 tokens/s (measured: median of 5 trial steps at micro-batch 8, its update once per "
            "optimizer step); fastest step 2,000 tokens/s (measured") in text
    # the figures survive a profile's or --json's round trip
    assert PlanRecord.model_validate(plan.model_dump(mode="json")).fastest_tokens_per_s == pytest.approx(2000.0)
    # two ranks: each figure beside its own sum (t10's M2: the fastest step's repeated the median's)
    from autofit.report.rates import plan_rate_words
    words = plan_rate_words(plan.model_copy(update={"world_size": 2}))
    assert "1,111 tokens/s per rank, ~2,222 for the 2 ranks (measured: median" in words, words
    assert "fastest step 2,000 tokens/s per rank, ~4,000 for the 2 ranks (measured" in words, words


def test_the_plan_and_the_v_table_say_when_re_timings_moved_a_trials_figure():
    """t11's L2 (session 17): the trial line said '1,500 tok/s' (its own steps' fastest, at trial
    time), the plan 'fastest step 5,154' after the contest's re-timings added steps, and nothing
    said why they differ. The plan's words and the -v row now say the re-timings came after."""
    import io
    from rich.console import Console
    from autofit.planning.split import plan_rates
    from autofit.report import render, tables
    t = TrialRecord(micro_batch=8, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                    status="fit", tokens_per_step=1000, step_seconds=[1.0, 0.9, 0.3, 0.4], tokens_per_s=1000 / 0.3,
                    measured_peak_bytes=10**6, retimed_steps=2)
    quiet = t.model_copy(update={"micro_batch": 4, "retimed_steps": 0})
    plan = two_rank_plan(world_size=1, micro_batch=8, grad_accum=2, micro_batches=[8, 8], effective_batch=16,
                         split="16 = 2 × 8", **plan_rates([8, 8], 10, [t]))
    out = io.StringIO()
    console = Console(file=out, width=400)
    render._plan(_probe_of(plan, [t, quiet]), None, console, verbose=False)
    tables.candidates_table(_probe_of(plan, [t, quiet]), console)
    text = out.getvalue()
    assert "median of 4 trial steps (2 of them the contest's re-timings, after its trial line) at micro-batch 8" \
        in text, text
    rows = {line.split("│")[2].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert "(1)" in rows["8"] and "(1)" not in rows["4"], text
    assert f"(1) {tables.RETIMED_NOTE}" in text
    # a plan whose trial no re-timing touched says nothing of them
    out = io.StringIO()
    render._plan(_probe_of(plan, [t.model_copy(update={"retimed_steps": 0})]), None, Console(file=out, width=400),
                 verbose=False)
    assert "re-timings" not in out.getvalue()


def test_the_plan_against_the_config_as_written_gives_the_fastest_and_the_median_ratio():
    """'the plan runs 8.24x as fast' (t5's L2) compared each one's fastest step; it says so, with
    the ratio of their median steps and how many steps each had beside it."""
    from autofit.report.rates import against_plan
    own = TrialRecord(micro_batch=4, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                      status="fit", tokens_per_step=100, step_seconds=[8.0, 1.0], tokens_per_s=100.0)
    mine = own.model_copy(update={"micro_batch": 8, "step_seconds": [0.5, 0.5, 0.5], "tokens_per_step": 100})
    plan = two_rank_plan(world_size=1, micro_batch=8, grad_accum=2, micro_batches=[8, 8], effective_batch=16, split="16 = 2 × 8")
    res = SimpleNamespace(plan=plan, trials=[own, mine], device=SimpleNamespace(kind="cuda"))
    words = against_plan(res, own)
    assert "the plan runs 2.00x as fast, by time per token of each one's fastest step" in words
    assert ", 9.00x by their median steps (2 and 3 timed)" in words


def test_the_config_as_written_is_estimated_as_its_ranks_and_policy_run_it():
    """No trial of the config as written: the closed-form estimate takes its selective policy and,
    on 2 ranks (torchrun) with gradient_accumulation_steps 2, one micro-batch per rank (no
    gradients held across micro-batches), FSDP2's shards where the plan shards."""
    from autofit.planning.estimate import ModelShape, estimate_peak
    from autofit.report.render import as_written_verdict
    from autofit.units import fmt_bytes
    cfg = cfg_of("gradient_accumulation_steps=2", "checkpointing=1", "checkpointing_policy=selective")
    for parallelism in ("ddp", "fsdp2"):
        res = SimpleNamespace(mode="measured", trials=[], budget=SimpleNamespace(budget_bytes=10**10),
                              device=SimpleNamespace(kind="cpu", bf16_supported=False),
                              plan=two_rank_plan(world_size=2, parallelism=parallelism))
        want = estimate_peak(ModelShape.from_config(cfg), 16, dtype="float32", checkpointing=1, loss_impl="standard",
                             device="cpu", n_micro=1, checkpointing_policy="selective", world_size=2,
                             parallelism=parallelism, ce_chunk_size=cfg.ce_chunk_size).peak_bytes
        full = estimate_peak(ModelShape.from_config(cfg), 16, dtype="float32", checkpointing=1, loss_impl="standard",
                             device="cpu", n_micro=2, ce_chunk_size=cfg.ce_chunk_size).peak_bytes
        assert want != full
        assert f"needs ~{fmt_bytes(want)} against" in as_written_verdict(res, cfg)


def test_a_step_line_on_several_ranks_says_whose_figures_they_are():
    """tokens/s is the whole run's (all ranks), the micro-batches each rank's, the peak rank 0's
    (the only rank that prints): unlabelled, 2,000 tok/s beside a one-rank peak read as one process's."""
    from trainer.metrics import describe_step
    rec = dict(step=1, loss=1.0, lr=1e-3, step_s=0.1, tokens_per_s=2000.0, micro_batch=4, grad_accum=2,
               micro_batches=[4, 4], world_size=2, peak_mem_bytes=3 * 2**20)
    assert describe_step(rec).endswith("2,000 tok/s (2 ranks), micro-batch 4 x 2 per rank, peak 3.0 MiB on rank 0")
    assert describe_step({**rec, "world_size": 1}).endswith("2,000 tok/s, micro-batch 4 x 2, peak 3.0 MiB")


def test_the_chosen_row_of_a_plan_mixing_sizes_points_at_the_plan_lines_figure():
    """t12's L3 (session 18): -v's `>` row said '22,450 est.' (micro-batch 14) and the plan
    '22,392 tokens/s' (its 14 x 9 + 13 x 10 split), and nothing said why they differ. The row's
    footnote now names the split and the plan's figure; a row whose figure is the plan's has none."""
    import io
    from rich.console import Console
    from autofit.report import tables
    t = TrialRecord(micro_batch=14, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                    status="fit", tokens_per_step=14 * 64, tokens_per_s=22450.0, estimated_peak_bytes=10**6)
    split = "256 = 14 × 9 + 13 × 10"
    plan = two_rank_plan(mode="estimated", world_size=1, micro_batch=14, grad_accum=19,
                         micro_batches=[14] * 9 + [13] * 10, effective_batch=256, split=split,
                         tokens_per_s=22392.0, measured_peak_bytes=None, estimated_peak_bytes=10**6)

    def table(plan, trials):
        out = io.StringIO()
        tables.candidates_table(SimpleNamespace(**{**vars(_probe_of(plan, trials)), "mode": plan.mode}),
                                 Console(file=out, width=400))
        return out.getvalue()
    text = table(plan, [t])
    row = next(line for line in text.splitlines() if "│ >" in line)
    assert "22,450 est." in row and "(1)" in row, text
    assert f"(1) the plan runs {split}, not 14 alone: 22,392 tokens/s, the plan line's figure" in text, text
    assert "the plan runs" not in table(plan.model_copy(update={"tokens_per_s": 22450.2}), [t])  # the same figure
    even = plan.model_copy(update={"micro_batches": [16] * 16, "micro_batch": 16, "split": "256 = 16 × 16"})
    assert "the plan runs" not in table(even, [t.model_copy(update={"micro_batch": 16})])
    # measured: the row is the trial's fastest step, the plan's is its split's fastest
    timed = t.model_copy(update={"step_seconds": [0.04], "tokens_per_s": 14 * 64 / 0.04})
    measured = plan.model_copy(update={"mode": "measured", "fastest_tokens_per_s": 22000.0, "measured_peak_bytes": 10**6})
    assert "not 14 alone: 22,000 tokens/s at its fastest step, the plan line's figure" in table(measured, [timed])


def test_records_noted_before_the_run_record_follow_it_and_none_is_lost(tmp_path):
    """t12's L5 (session 18): a resume's world_size_changed event (noted while loading the
    checkpoint) was written before the resume's own 'run' record, which the README says comes
    first. Such records are held until the 'run' record; a run that stops before it keeps them."""
    import json
    from trainer.metrics import MetricsLog

    def kinds(path):
        return [json.loads(line)["type"] for line in (path / "metrics.jsonl").read_text().splitlines()]
    log = MetricsLog(tmp_path)
    log.write({"type": "event", "event": "world_size_changed"})
    log.write({"type": "run", "resumed_at": 40})
    log.write({"type": "train", "step": 40})
    log.close()
    assert kinds(tmp_path) == ["run", "event", "train"]
    early = tmp_path / "early"
    early.mkdir()
    log = MetricsLog(early)
    log.write({"type": "event", "event": "world_size_changed"})
    log.close()  # the Trainer's set-up failed after the event: written all the same
    assert kinds(early) == ["event"]
    rank1 = tmp_path / "rank1"
    rank1.mkdir()
    log = MetricsLog(rank1, master=False)
    log.write({"type": "event", "event": "x"})
    log.close()
    assert not (rank1 / "metrics.jsonl").exists()
