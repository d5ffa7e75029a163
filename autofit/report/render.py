"""Human output of a probe. Every figure says whether it was measured on this device or estimated.

Default (short): the device, what the user's own config as written would need against the
budget, then the plan and what it changes, in plain words, and where the memory goes. With
verbose (`probe -v`): also the budget's terms, every candidate tried, and why the plan won.
"""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from autofit.devices.info import with_details
from autofit.units import fmt_bytes, measured_peak_words
from trainer.model.sac_ops import saved_ops_words
from trainer.errors import counted
from trainer.metrics import micro_batch_words
from autofit.report.rates import _key, against_plan as _against_plan, plan_rate_words
from autofit.report.tables import (COMPILE_NOT_ESTIMATED, SHORT_DTYPE, bytes_cell as _b, budget_table,
                                   candidates_table, render_breakdown)


def _source_words(source: str) -> str:
    """Where the device's figures were read, in words ('source cpu' read as jargon: t7's L15)."""
    if source == "cpu":
        return "the budgeted CPU device: its budget, RAM read from the OS"
    if source.startswith("profile:"):
        return f"from profile {source.split(':', 1)[1]}"
    return f"read via {source}"


def _kind(res) -> str:
    return "cpu" if res.device.kind == "cpu" else "cuda"


def device_line(res) -> str:
    """'device: NAME (KIND, total, free; where read)'; with several ranks, whose device it is (the
    smallest budget's rank, the one the plan fits) and this rank's own figures (ProbeResult.device_ranks)."""
    d = res.device
    details = f"{d.kind}, {fmt_bytes(d.total_bytes)} total, {fmt_bytes(d.free_bytes)} free; {_source_words(d.source)}"
    return f"device: {with_details(d.name, details)}" + (f", {res.device_ranks}" if getattr(res, "device_ranks", "") else "")


def render_probe(res, console: Console, cfg=None, verbose: bool = False) -> None:
    """Print a ProbeResult (autofit.planning.planner) for a person. `cfg` (the TrainConfig probed) adds the
    'your config as written' line and the plan's changes to it; `verbose` adds the budget, the
    candidates table and the planner's reasoning."""
    d = res.device
    src = "measured" if res.mode == "measured" else "ESTIMATED (no such GPU here; nothing was run)"
    from rich.markup import escape
    console.print("[bold]device[/]: " + escape(device_line(res).removeprefix("device: ")))
    if verbose and getattr(d, "note", ""):
        console.print(f"  note: {d.note}")
    console.print(f"[bold]mode[/]: {src}")
    if cfg is not None:
        from trainer.config.stages import fitted_config
        staged, cfg = cfg, fitted_config(cfg)  # a schedule (trainer/config/stages.py): its largest stage, as probed
        console.print(f"[bold]your config as written[/] ({as_written_label(cfg, res)}): {as_written_verdict(res, cfg)}")
        console.print(f"[bold]model[/]: {model_words(cfg)}")
        for line in stage_lines(staged, res.plan) if staged.stages else []:
            console.print(line, markup=False)
    if verbose:
        console.print(f"[bold]target[/]: {counted(res.effective_batch, 'sequence')} x {res.block_size} tokens = "
                      f"{res.effective_batch * res.block_size:,} tokens per optimizer step (kept exact)")
        budget_table(res, console)
        candidates_table(res, console)
    _plan(res, cfg, console, verbose)
    render_breakdown(res.breakdown, res.budget.budget_bytes, res.plan.measured_peak_bytes, console)
    if not verbose:
        console.print("[dim](-v: the budget, every candidate and why this plan won)[/]")


def stage_lines(cfg, plan) -> list[str]:
    """A staged config's schedule under `plan`: which stage was fitted and why, and each stage's
    micro-batches (the fitted micro-batch's tokens never exceeded, its effective batch exact)."""
    from trainer.config.stages import fitted_stage, stage_micro_batch
    from trainer.step import describe_split, split_batch
    k = fitted_stage(cfg.stages)
    n = len(cfg.stages)
    out = [f"schedule: {n} stage{'s' if n != 1 else ''}; the plan fits stages[{k}] (the largest block size, "
           f"{cfg.stages[k].block_size}: the most memory per sequence); each stage runs at most "
           f"{plan.micro_batch * plan.block_size:,} tokens per micro-batch, its effective batch exact"]
    start = 0
    for i, st in enumerate(cfg.stages):
        rank_batch = st.effective_batch // plan.world_size
        mbs = split_batch(rank_batch, stage_micro_batch(plan.micro_batch, plan.block_size, st.block_size, rank_batch))
        end = f"to {st.until_iter - 1}" if st.until_iter is not None else "on"
        out.append(f"  stages[{i}] steps {start} {end}: {st.words()}; micro-batches {describe_split(mbs)}"
                   + (" per rank" if plan.world_size > 1 else "") + (" (fitted)" if i == k else ""))
        start = st.until_iter or start
    return out


def model_words(cfg) -> str:
    """'GPT-2 (learned positions, LayerNorm, GELU, tied embeddings), AdamW' or the options that differ:
    'rope (base 100000), rmsnorm, qk-norm, relu2 MLP, 2 of 6 heads for K/V (GQA), untied
    embeddings, logits soft-capped at 15, Muon for the blocks' matrices + AdamW'."""
    from trainer.config.model_options import MODERN_DEFAULTS
    if all(getattr(cfg, k) == v for k, v in MODERN_DEFAULTS.items() if k != "checkpointing_policy"):
        return "GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings), AdamW"
    w = []
    w.append(f"rope (base {cfg.rope_base:g})" if cfg.pos_emb == "rope" else "learned positions")
    w.append("rmsnorm" if cfg.norm == "rmsnorm" else "layernorm")
    if cfg.qk_norm:
        w.append("qk-norm")
    w.append(f"{cfg.mlp} MLP")
    if cfg.n_kv_head not in (None, cfg.n_head):
        w.append(f"{cfg.n_kv_head} of {cfg.n_head} heads for K/V (GQA)")
    w.append("tied embeddings" if cfg.tie_embeddings else "untied embeddings")
    if cfg.logit_softcap:
        w.append(f"logits soft-capped at {cfg.logit_softcap:g}")
    w.append("Muon for the blocks' matrices + AdamW" if cfg.optimizer == "muon" else "AdamW")
    return ", ".join(w)


def config_dtype(cfg, res) -> str:
    return cfg.resolved_dtype(_kind(res), bool(res.device.bf16_supported))


def as_written_label(cfg, res) -> str:
    """'16 x 32, standard loss, bf16, compile': the config's micro-batch x accumulation and levers."""
    parts = [f"{cfg.batch_size} x {cfg.gradient_accumulation_steps}", f"{cfg.loss_impl} loss",
             SHORT_DTYPE.get(config_dtype(cfg, res), config_dtype(cfg, res))]
    if cfg.checkpointing:
        parts.append(f"checkpointing every {cfg.checkpointing}"
                     + (" (selective)" if cfg.checkpointing_policy == "selective" else ""))
    parts.append("compile" if cfg.compile else "eager")
    return ", ".join(parts)


def as_written_verdict(res, cfg) -> str:
    """Whether the config as written fits the budget: measured when a trial ran exactly that
    candidate, else the closed-form estimate (autofit.planning.estimate.estimate_peak), labelled."""
    budget = res.budget.budget_bytes
    policy = cfg.checkpointing_policy if cfg.checkpointing else "full"
    want = (cfg.batch_size, config_dtype(cfg, res), bool(cfg.compile), cfg.checkpointing, cfg.loss_impl, policy)
    for t in res.trials:
        if res.mode == "measured" and _key(t) == want:
            if t.status == "fit":
                return (f"fits: {measured_peak_words(t)} of a {fmt_bytes(budget)} budget"
                        f"{_against_plan(res, t)} (measured)")
            if t.status in ("oom", "over_budget", "spill"):
                peak = f"{measured_peak_words(t)}; " if t.measured_peak_bytes else ""
                return f"{peak}it ran out of the {fmt_bytes(budget)} budget (measured: {t.status.replace('_', ' ')})"
            if t.status in ("error", "leak"):  # measured, and not a fit: never the estimate's word instead
                return f"its trial ran and is not a fit: {t.status} ({(t.note or '').splitlines()[0][:160]}) (measured)"
    from autofit.planning.estimate import ModelShape, estimate_peak
    # as the plan's ranks run it: each rank accumulates its share of the micro-batches (torchrun)
    ranks, parallelism = res.plan.world_size, res.plan.parallelism
    n_micro = 2 if cfg.gradient_accumulation_steps > ranks else 1
    est = estimate_peak(ModelShape.from_config(cfg), cfg.batch_size, dtype=want[1], checkpointing=cfg.checkpointing,
                        loss_impl=cfg.loss_impl, compile=False, device=_kind(res), ce_chunk_size=cfg.ce_chunk_size,
                        n_micro=n_micro, checkpointing_policy=policy, world_size=ranks,
                        step_batch=cfg.batch_size * cfg.gradient_accumulation_steps // ranks,
                        parallelism=parallelism if ranks > 1 else "ddp").peak_bytes
    how = "estimated, closed form" + ("; compile's memory effect is not estimated" if cfg.compile else "")
    if est <= budget:
        return f"needs ~{fmt_bytes(est)} against a {fmt_bytes(budget)} budget: it fits ({how}){_against_estimated(res, want)}"
    return f"needs ~{fmt_bytes(est)} against a {fmt_bytes(budget)} budget: it would run out of memory ({how})"


def _against_estimated(res, want) -> str:
    """Estimated mode: how the plan compares with the config as written, as autofit.planning.
    estimated wrote it on the row of that candidate (the plan keeps it, or runs N x as fast by
    estimated step time), or '' where no row says."""
    from autofit.planning.estimated import VS_PLAN
    if res.mode != "estimated":
        return ""
    for t in res.trials:
        if (t.micro_batch, t.dtype, t.checkpointing, t.loss_impl, t.checkpointing_policy) == \
                (want[0], want[1], want[3], want[4], want[5]) \
                and VS_PLAN in (t.note or ""):
            return "; " + t.note.split(VS_PLAN, 1)[1]
    return ""


def plan_changes(plan, cfg, res) -> list[str]:
    """What the plan does differently from the config, in words a person reads without knowing
    the planner: ['keeps your effective batch of 512', 'runs 27 sequences at a time, ...']."""
    ranks, total = plan.world_size, plan.effective_batch * plan.world_size  # torchrun: the plan is each rank's
    words = [f"keeps your effective batch of {counted(total, 'sequence')} ({total * plan.block_size:,} tokens per optimizer step)"
             + (f", {plan.effective_batch} on each of {ranks} ranks ({plan.parallelism})" if ranks > 1 else "")]
    instead = f"instead of {cfg.batch_size} x {cfg.gradient_accumulation_steps}" + (" in all" if ranks > 1 else "")
    if (plan.micro_batch, plan.grad_accum * ranks) != (cfg.batch_size, cfg.gradient_accumulation_steps):
        if plan.grad_accum == 1:
            words.append(f"runs {'all ' * (plan.micro_batch != 1)}{counted(plan.micro_batch, 'sequence')} at once (no gradient "
                         f"accumulation), {instead}")
        else:
            words.append(f"runs {plan.micro_batch} sequence{'s' * (plan.micro_batch != 1)} at a time, "
                         f"{plan.grad_accum} times per step "
                         f"({plan.split}), {instead}")
    else:
        # several ranks: the config's accumulation is all ranks' (nanoGPT divides it by them), so
        # say what each rank runs, not 'M x A' as if one rank ran it
        per = f"{plan.grad_accum} micro-batch{'es' if plan.grad_accum != 1 else ''} of {plan.micro_batch}"
        words.append(f"runs {plan.micro_batch} x {plan.grad_accum} as written" if ranks == 1 else
                     f"runs your {cfg.batch_size} x {cfg.gradient_accumulation_steps} as written: each of the "
                     f"{ranks} ranks runs {per} per optimizer step ({plan.micro_batch} x {plan.grad_accum} per rank)")
    if plan.loss_impl != cfg.loss_impl:
        from trainer.model.ce import chunked_path
        words.append(f"uses the chunked loss ({chunked_path(cfg.logit_softcap)}: cross-entropy in chunks, never "
                     "the full fp32 logits)" if plan.loss_impl == "chunked" else "uses the standard loss")
    policy = cfg.checkpointing_policy if cfg.checkpointing else "full"
    if (plan.checkpointing, plan.checkpointing_policy) != (cfg.checkpointing, policy):
        every = "every block" if plan.checkpointing == 1 else f"every {plan.checkpointing} blocks"
        words.append(f"recomputes activations in backward {every} ({plan.checkpointing_policy} "
                     "activation checkpointing: less memory, more compute)" if plan.checkpointing
                     else "turns activation checkpointing off")
    if plan.dtype != config_dtype(cfg, res):
        words.append(f"trains in {plan.dtype} instead of {config_dtype(cfg, res)}")
    if plan.compile != bool(cfg.compile):
        # t7's L14: on the budgeted CPU device the reason was only in -v's why
        cannot = res is not None and getattr(res, "device", None) is not None and res.device.kind == "cpu" \
            and res.mode == "measured"
        words.append(("runs eager (compile off: torch.compile cannot be measured on the budgeted CPU device, whose "
                      "memory tracker keeps Dynamo from compiling)" if cannot else "runs eager (compile off)")
                     if not plan.compile else "compiles")
    return words


def checkpointing_words(checkpointing: int, policy: str = "full") -> str:
    """'activation checkpointing every 1 block, selective: matmuls (mm, addmm, bmm) and attention
    outputs (4 SDPA kernels) kept, the rest recomputed' (the ops read from trainer/model/sac_ops.py
    SAC_SAVED_OPS), '... full: each block's input kept, the rest recomputed', or '... off'."""
    if not checkpointing:
        return "activation checkpointing off"
    every = f"activation checkpointing every {checkpointing} block{'s' if checkpointing > 1 else ''}"
    if policy == "selective":
        return f"{every}, selective: {saved_ops_words()}"
    return f"{every}, full: only each checkpointed block's input kept, the rest recomputed"


def plan_line(p, trials=()) -> str:
    """The plan in one line, as `autofit run` prints it before training; then, for the probe's
    `trials` (those the plan was chosen from: a probe's just now, or a saved plan's), a line per lever combination an error that is not out
    of memory stopped, as probe's plan says it (_plan): the lever the user asked for may be one,
    and the plan's other lever is no loss on memory or speed."""
    from autofit.planning.candidates import error_lines
    errors = "".join(f"\n  [bold red]error[/]: {escape(line)}" for line in error_lines(trials))
    ranks = f"{p.world_size} ranks ({p.parallelism}) x " if p.world_size > 1 else ""
    return (f"  {ranks}{micro_batch_words(p.micro_batches, p.micro_batch, p.grad_accum)} ({p.split}), {p.dtype}, "
            f"compile {'on after ' + str(p.compile_after) + ' steps' if p.compile else 'off'}, "
            f"{checkpointing_words(p.checkpointing, p.checkpointing_policy)}, loss {p.loss_impl}; "
            + (measured_peak_words(p) if p.measured_peak_bytes else
               f"estimated peak {_b(p.estimated_peak_bytes)}") + f" of {_b(p.budget_bytes)} budget" + errors)


def _compile_words(res, p) -> str:
    if not p.compile:
        return "compile off"
    text = f"compile on after {p.compile_after} eager steps"
    return text + f" ({COMPILE_NOT_ESTIMATED})" if res.mode == "estimated" else text


def _plan(res, cfg, console: Console, verbose: bool) -> None:
    p = res.plan
    label = "measured" if res.mode == "measured" else "estimated"
    console.print(f"[bold]plan[/] ({label})")
    if cfg is not None:
        console.print("  " + "; ".join(plan_changes(p, cfg, res)))
    else:
        console.print(f"  {micro_batch_words(p.micro_batches, p.micro_batch, p.grad_accum)}: {p.split}"
                      + (f" on each of {p.world_size} ranks ({p.parallelism})" if p.world_size > 1 else ""))
    console.print(f"  dtype {p.dtype}, {_compile_words(res, p)}, {checkpointing_words(p.checkpointing, p.checkpointing_policy)}, "
                  f"loss {p.loss_impl}")
    peak = measured_peak_words(p) if p.measured_peak_bytes else \
        f"estimated peak {fmt_bytes(p.estimated_peak_bytes)}"
    console.print(f"  {peak} of a {fmt_bytes(p.budget_bytes)} budget; {plan_rate_words(p, res)}")
    from autofit.planning.candidates import error_lines
    for line in error_lines(getattr(res, "trials", []), listed=verbose):  # not a loss on memory or speed: said even without -v
        console.print(f"  [bold red]error[/]: {escape(line)}", highlight=False)
    if verbose:
        console.print(f"  why: {p.reason}")
