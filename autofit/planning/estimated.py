"""The estimated probe: no matching GPU here (`autofit probe --gpu NAME`), so the closed-form
estimate (autofit.planning.estimate) and the throughput model (autofit.planning.throughput) are the
whole answer, and every figure says so.

For each lever combination, the largest micro-batch whose estimated peak fits; the combination
with the highest estimated tokens/s wins. Where the config as written fits, its split is compared
with the plan's by estimated step time: within the contest's tie band (autofit.planning.contest.TIE)
the plan keeps it, else the plan says how much faster it is estimated to run.
"""
from __future__ import annotations

from autofit.planning.budget import Budget
from autofit.planning.candidates import Levers, Space, lever_combos
from autofit.planning.contest import TIE
from autofit.planning.estimate import ModelShape, estimate_peak, max_micro_batch
from autofit.planning.planner import _nothing_fits
from autofit.planning.split import choose_split
from autofit.planning.throughput import ASSUMED_MFU, estimated_tokens_per_s, peak_tflops, rate_words, step_floors
from autofit.records import PlanRecord, ProbeResult, TrialRecord
from autofit.units import fmt_bytes
from trainer.compiler import resolve_compile_after
from trainer.step import describe_split


def rate_how(hw) -> str:
    """How this mode's throughput figures for hardware profile `hw` are made, said wherever one is
    printed (a sustained_tflops card's words name the sustained rate)."""
    return f"estimated: {rate_words(hw)}"


OWN_NOTE = "your config as written"  # the note of its row when no combination's row is that candidate
VS_PLAN = "against the plan: "  # the own row's note then says how the plan compares with it


def probe_estimated(cfg, info, hw, budget: Budget, space: Space) -> ProbeResult:
    """No matching GPU here: the estimate is the whole answer, and says so (module docstring).
    `info`: the simulated card's DeviceInfo; `hw`: its hardware profile (peak TFLOP/s).
    Raises PlanError when no combination fits even at micro-batch 1."""
    shape = ModelShape.from_config(cfg)
    E = cfg.effective_batch
    trials, best = _largest_fits(cfg, shape, hw, budget, space)
    if best is None:
        _nothing_fits(cfg, trials, budget, "cuda", estimated=True)
    n_combos = len([t for t in trials if t.status == "fit"])
    compile_on = True in space.compile
    micro_batches, why_split = choose_split(E, best.micro_batch, _rates(shape, best, hw, cfg, E, compile_on),
                                            cfg.block_size)
    own = _own_row(cfg, info, shape, hw, budget, trials, space)
    own_why = ""
    if own is not None:
        plan_s = _step_seconds(shape, best, micro_batches, hw, cfg, compile_on)
        own_s = _step_seconds(shape, own, [own.micro_batch] * (E // own.micro_batch), hw, cfg, compile_on)
        if own_s <= (1 + TIE) * plan_s:  # within the tie band: the user's split is kept
            best, micro_batches = own, [own.micro_batch] * (E // own.micro_batch)
            why_split = "your own split, kept"
            verdict = (f"the plan keeps it (its estimated step time is within {TIE:.0%} of the fastest "
                       f"combination's; {rate_how(hw)})")
        else:
            verdict = f"the plan runs {own_s / plan_s:.2f}x as fast by estimated step time ({rate_how(hw)})"
        own_why = (f"; your own {cfg.batch_size} x {cfg.gradient_accumulation_steps} fits (estimated peak "
                   f"{fmt_bytes(own.estimated_peak_bytes)}): {verdict}")
        own.note += f"; {VS_PLAN}{verdict}"  # for the 'your config as written' line (autofit.report.render)
    est_tps = _rates(shape, best, hw, cfg, E, compile_on)
    if max(micro_batches) != best.micro_batch:  # the row of the plan is the size it runs
        best.note += f"; the plan runs {max(micro_batches)} (the split of {E}), the largest that fits is {best.micro_batch}"
        best.micro_batch = max(micro_batches)
    best.tokens_per_s = est_tps[best.micro_batch]  # the rate of the size the plan runs
    est = estimate_peak(shape, max(micro_batches), **Levers.of(best).estimate_args(), device="cuda",
                        ce_chunk_size=cfg.ce_chunk_size, n_micro=min(2, len(micro_batches)))
    best.estimated_peak_bytes = est.peak_bytes
    plan = PlanRecord(mode="estimated", micro_batch=max(micro_batches), grad_accum=len(micro_batches),
                      micro_batches=micro_batches, effective_batch=E, block_size=cfg.block_size, dtype=best.dtype,
                      compile=compile_on, compile_after=resolve_compile_after(cfg) if compile_on else 0,
                      checkpointing=best.checkpointing, loss_impl=best.loss_impl,
                      checkpointing_policy=best.checkpointing_policy,
                      estimated_peak_bytes=est.peak_bytes, measured_peak_bytes=None,
                      # the whole step's rate: an uneven split's sizes each at their own rate
                      tokens_per_s=E * cfg.block_size / _step_seconds(shape, best, micro_batches, hw, cfg, compile_on),
                      budget_bytes=budget.budget_bytes,
                      split=describe_split(micro_batches),
                      reason=(f"estimated only (no {hw.name} here): highest estimated tokens/s among "
                              f"{n_combos} lever combinations whose estimated peak fits "
                              f"{fmt_bytes(budget.budget_bytes)}; compile kept as configured "
                              f"(its memory effect is measured, never guessed: probe on the card to confirm); "
                              f"split: {why_split} (estimated step times){own_why}; "
                              f"{_bound_words(shape, best, hw, cfg, E, compile_on)}"))
    return ProbeResult(mode="estimated", device=info, budget=budget, effective_batch=E, block_size=cfg.block_size,
                       trials=trials, plan=plan, breakdown=est.breakdown, rate_words=rate_words(hw))


def _largest_fits(cfg, shape: ModelShape, hw, budget: Budget, space: Space) -> tuple[list[TrialRecord], TrialRecord | None]:
    """Per lever combination, the largest micro-batch (<= the effective batch) whose estimated
    peak fits, as an estimated 'fit' row (or a 'pruned' one when not even 1 fits), and the row
    with the highest estimated tokens/s (None when none fits)."""
    E = cfg.effective_batch
    trials: list[TrialRecord] = []
    best = None
    for lv in lever_combos(space):
        m = min(E, max_micro_batch(shape, budget.budget_bytes, **lv.estimate_args(), compile=False, device="cuda",
                                   ce_chunk_size=cfg.ce_chunk_size))
        whole = estimate_peak(shape, E, **lv.estimate_args(), compile=False, device="cuda",
                              ce_chunk_size=cfg.ce_chunk_size, n_micro=1)
        if m < E and whole.peak_bytes <= budget.budget_bytes:
            m = E  # one micro-batch holds no gradients while another runs (as the measured search sizes it)
        est = whole if m == E else estimate_peak(shape, max(m, 1), **lv.estimate_args(), compile=False,
                                                 device="cuda", ce_chunk_size=cfg.ce_chunk_size)
        if m == 0:
            trials.append(TrialRecord(**lv.candidate(1).model_dump(), status="pruned",
                                      estimated_peak_bytes=est.peak_bytes,
                                      note="estimated not to fit even at micro-batch 1"))
            continue
        tps = estimated_tokens_per_s(shape, m, lv.dtype, lv.checkpointing, hw, lv.checkpointing_policy, cfg.tf32, E,
                                     **_host(cfg, lv, True in space.compile))
        rec = TrialRecord(**lv.candidate(m).model_dump(), status="fit", estimated_peak_bytes=est.peak_bytes,
                          tokens_per_s=tps,
                          note=f"estimated: largest micro-batch whose estimated peak fits; tokens/s {rate_how(hw)}")
        trials.append(rec)
        if best is None or tps > best.tokens_per_s:
            best = rec
    return trials, best


def _host(cfg, levers, compiled: bool) -> dict:
    """The host floor's arguments of throughput.step_floors for a row's (or Levers') loss and
    `compiled` (the plan compiles: its steady state runs the compiled blocks)."""
    return {"compiled": compiled, "loss_impl": levers.loss_impl, "ce_chunk_size": cfg.ce_chunk_size}


def _rates(shape: ModelShape, row: TrialRecord, hw, cfg, step_batch: int, compiled: bool) -> dict[int, float]:
    """Estimated tokens/s of `row`'s levers at every micro-batch up to its own, in optimizer steps
    of `step_batch` sequences."""
    return {m: estimated_tokens_per_s(shape, m, row.dtype, row.checkpointing, hw, row.checkpointing_policy, cfg.tf32,
                                      step_batch, **_host(cfg, row, compiled))
            for m in range(1, row.micro_batch + 1)}


def _bound_words(shape: ModelShape, row: TrialRecord, hw, cfg, step_batch: int, compiled: bool) -> str:
    """Which floor of the roofline sets the plan's estimated rate, and the three floors."""
    f = step_floors(shape, row.micro_batch, row.dtype, row.checkpointing, hw, row.checkpointing_policy, cfg.tf32,
                    step_batch, **_host(cfg, row, compiled))
    # the rate the compute floor assumes, then the card's figure it is a share of: '58.3 TFLOP/s' alone
    # read as the rate reached (t11's L6), where the estimate takes ASSUMED_MFU of it
    card = peak_tflops(hw, row.dtype, cfg.tf32)
    of = (f"the {card:.3g} TFLOP/s {row.dtype} {hw.name} sustains at its power limit ({hw.sustained_tflops:g} of "
          f"{hw.peak_fp16_tflops:g} fp16)" if getattr(hw, "sustained_tflops", None)
          else f"the card's {card:.3g} TFLOP/s {row.dtype} peak")
    rate = f"{card * ASSUMED_MFU:.3g} TFLOP/s, an assumed {ASSUMED_MFU:.0%} MFU of {of}"
    return (f"its estimated rate is bound by {f.bound} (compute at {rate}; per micro-batch of {row.micro_batch}: compute "
            f"{f.compute * 1e3:.3g} ms, memory {f.memory * 1e3:.3g} ms, host {f.host * 1e3:.3g} ms"
            f"{' with compiled blocks' if compiled else ''})")


def _step_seconds(shape: ModelShape, row: TrialRecord, micro_batches: list[int], hw, cfg, compiled: bool) -> float:
    """Estimated seconds of one optimizer step of `micro_batches` with `row`'s levers."""
    return sum(step_floors(shape, m, row.dtype, row.checkpointing, hw, row.checkpointing_policy, cfg.tf32,
                           sum(micro_batches), **_host(cfg, row, compiled)).seconds for m in micro_batches)


def _own_row(cfg, info, shape: ModelShape, hw, budget: Budget, trials: list[TrialRecord],
             space: Space) -> TrialRecord | None:
    """The config as written (its micro-batch, dtype, checkpointing and loss, eager) as an
    estimated row, added to `trials` unless one of them is that candidate already, where its
    levers are in the searched `space` (--dtype, --checkpointing, --loss can rule them out: then
    it cannot be the plan) and its estimated peak fits the budget; else None."""
    dtype = cfg.resolved_dtype("cuda", bool(info.bf16_supported))
    policy = cfg.checkpointing_policy if cfg.checkpointing else "full"  # as the lever combinations name it
    m = cfg.batch_size
    if not (0 < m <= cfg.effective_batch) or cfg.effective_batch % m:
        return None
    if dtype not in space.dtypes or cfg.checkpointing not in space.checkpointing or cfg.loss_impl not in \
            space.loss_impls or (cfg.checkpointing and policy not in space.checkpointing_policies):
        return None
    est = estimate_peak(shape, m, dtype=dtype, checkpointing=cfg.checkpointing, loss_impl=cfg.loss_impl,
                        checkpointing_policy=policy,
                        compile=False, device="cuda", ce_chunk_size=cfg.ce_chunk_size,
                        n_micro=2 if cfg.effective_batch > m else 1).peak_bytes
    if est > budget.budget_bytes:
        return None
    for t in trials:
        if (t.status, t.micro_batch, t.dtype, t.checkpointing, t.loss_impl, t.checkpointing_policy) == \
                ("fit", m, dtype, cfg.checkpointing, cfg.loss_impl, policy):
            return t
    first = next(t for t in trials)
    row = TrialRecord(**first.candidate().model_copy(update={"micro_batch": m, "dtype": dtype,
                                                             "checkpointing": cfg.checkpointing,
                                                             "loss_impl": cfg.loss_impl,
                                                             "checkpointing_policy": policy}
                                                     ).model_dump(),
                      status="fit", estimated_peak_bytes=est,
                      tokens_per_s=estimated_tokens_per_s(shape, m, dtype, cfg.checkpointing, hw,
                                                          policy, cfg.tf32, cfg.effective_batch,
                                                          compiled=True in space.compile, loss_impl=cfg.loss_impl,
                                                          ce_chunk_size=cfg.ce_chunk_size),
                      note=f"{OWN_NOTE}: estimated peak fits; tokens/s {rate_how(hw)}")
    trials.append(row)
    return row
