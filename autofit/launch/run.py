"""`autofit run`: from a config (and maybe a saved profile) to a training run with a fitted plan.

- With --profile: a saved plan whose fingerprint matches starts training at once; a missing or
  stale one is probed, saved, then used.
- Without: probe on this device first, then train.
The plan reaches the trainer as RunOptions; run-time lessons (OOM shrinks, compile fallbacks)
come back through on_event and are written into the profile so the next run starts right.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from autofit.planning import agree
from autofit.planning.budget import device_budget
from autofit.devices.opener import open_device
from autofit.devices.hardware import builtin_hardware as _builtin_hardware, cpu_slug, slug_for
from trainer.errors import counted
from autofit.launch.checks import check_saved_plan, say_config_notes
from autofit.launch.probe import ProbeOptions, probe_on, probe_space, run_probe
from autofit.launch.profile_gpu import gpu_for_profile, hardware_of, no_profile_words
from autofit.profiles.store import (FittedPlan, ProfileError, find_plan, fingerprint,
                                   fingerprint_inputs, lesson_notes, load_profile, nearest_plan, record_event,
                                   save_plan)
from autofit.records import PlanRecord, ProbeResult, judged_peak
from autofit.profiles.fingerprints import config_summary, not_reused_words
from autofit.launch.lowered import run_plan
from trainer.loop import RunOptions
from trainer.recovery import shrink_policy


def plan_fingerprint_inputs(cfg, info, emulated_on: str | None = None) -> dict:
    cuda = torch.version.cuda if info.kind == "cuda" else None
    summary = config_summary(cfg)
    # The plan picks the micro-batch itself: only the effective batch shapes it, so 16 x 32 and
    # 32 x 16 share one plan.
    summary.pop("batch_size", None)
    summary.pop("gradient_accumulation_steps", None)
    if emulated_on:  # a plan fitted under emulation is not one fitted on the card itself
        summary["emulated_on"] = emulated_on
    if info.kind == "cuda":  # expandable segments and other allocator settings change what fits
        from autofit.devices.cuda import allocator_settings
        summary["allocator"] = allocator_settings() or "default"
    summary.update(agree.fingerprint_fields(cfg))  # torchrun: a plan is for this many ranks
    return fingerprint_inputs(summary, torch.__version__.split("+")[0], cuda,
                              info.driver_version if info.kind == "cuda" else None)


def _for_other_ranks(changes: list[str]) -> str | None:
    """Words for a saved plan that differs only in its ranks ('ranks 2 -> 1'): it is not stale,
    it is for another launch, and the flag that uses it is said. Else None."""
    if len(changes) != 1 or not changes[0].startswith("ranks "):
        return None
    was, now = changes[0].removeprefix("ranks ").split(" -> ")
    return (f"its saved plan is for {was} rank{'s' * (was != '1')}, this run has {now}" +
            (f" (add --nproc-per-node {was} to use it)" if was != "1" else ""))


def profile_name_for(info) -> str:
    if info.kind == "cpu":
        return cpu_slug(info.total_bytes)
    return slug_for(info.name, info.total_bytes)


def hardware_dict_for(info, name: str) -> dict:
    if info.kind == "cpu":  # a budgeted CPU is named for its budget, so its profile records it
        return {"name": name, "gpu": "CPU (budgeted)", "kind": "cpu", "memory_bytes": info.total_bytes}
    known = _builtin_hardware(name)
    return known or {"name": name, "gpu": info.name, "kind": "cuda", "memory_bytes": info.total_bytes,
                     **({"compute_capability": list(info.compute_capability)} if info.compute_capability else {})}


def save_probe(res: ProbeResult, cfg, name: str | None = None, emulated_on: str | None = None,
               searched_under: list[str] | None = None) -> tuple[str, str, object]:
    """Stores the plan in the profile of the device it was measured on; returns (name, fingerprint, path).
    `searched_under`: the search flags the probe ran with (ProbeOptions.search_words), kept with
    the plan. With several ranks only rank 0 writes (the others return the path it writes to)."""
    if res.mode != "measured":
        raise ProfileError("--save stores measured plans only; a simulated GPU gives estimates")
    info = res.device
    name = name or profile_name_for(info)
    inputs = plan_fingerprint_inputs(cfg, info, emulated_on)
    fp = fingerprint(inputs)
    if not agree.ranks().master:
        from autofit.profiles.store import profile_path
        return name, fp, profile_path(name)
    plan = FittedPlan(fingerprint=fp, fingerprint_inputs=inputs, config_summary=config_summary(cfg),
                      plan=res.plan, trials=res.trials, searched_under=list(searched_under or []))
    hw = hardware_dict_for(info, name)
    builtin = info.kind == "cuda" and _builtin_hardware(name) is not None  # its table entry: defaults only
    sys.stdout.flush()  # piped, the plan printed above comes before these lines, not after (t8)
    for line in _replaced_words(name, plan, hw if info.kind == "cpu" else None):
        print(f"autofit: profile {name}: {line}", file=sys.stderr)
    def said(cleared: list[str]) -> None:  # t6's L2: a user who knew of the lesson is told it went
        print(f"autofit: profile {name}: the new probe replaces lessons runs learnt before it: {'; '.join(cleared)}",
              file=sys.stderr)
    return name, fp, save_plan(name, None if builtin else hw, plan, hardware_defaults=hw if builtin else None,
                               probed_since=res.started,  # lessons from before the probe go: it measured again
                               on_cleared=said)


def _replaced_words(name: str, plan, cpu_hw: dict | None) -> list[str]:
    """What a save changes that the user did not ask for in so many words (t7's M2, M9): a plan of
    the same fingerprint fitted under other search flags (a narrower probe replaces one fitted over
    every lever), and a budgeted CPU profile's memory (names are rounded: 64.6 and 65.4 MiB are both
    cpu-65mb), whose other plans were fitted at the old budget. Read before the save; a notice only."""
    from autofit.profiles.store import ProfileError, load_profile
    from autofit.units import fmt_bytes
    try:
        old = load_profile(name)
    except ProfileError:
        return []  # save_plan says what is wrong with the file
    if old is None:
        return []
    out = []
    before = old.plans.get(plan.fingerprint)
    if before is not None and before.searched_under != plan.searched_under:
        under = lambda w: "under " + ", ".join(w) if w else "over every lever"  # noqa: E731
        out.append(f"replaces plan {plan.fingerprint} fitted {before.updated:%Y-%m-%d %H:%M} {under(before.searched_under)} "
                   f"with this one fitted {under(plan.searched_under)}")
    was = (old.hardware or {}).get("memory_bytes")  # a CPU profile may have no [hardware] table
    if cpu_hw is not None and was and was != cpu_hw["memory_bytes"]:
        others = len([fp for fp in old.plans if fp != plan.fingerprint])
        out.append(f"its memory was {fmt_bytes(was)}, now {fmt_bytes(cpu_hw['memory_bytes'])} (this --budget)"
                   + (f"; {counted(others, 'other plan')} in it {'was' if others == 1 else 'were'} fitted at the old "
                      f"one (a run checks a saved plan's peak against the run's own budget)" if others else ""))
    return out


@dataclass
class Launch:
    cfg: object
    opts: RunOptions
    device: object
    plan: PlanRecord
    source: str  # human line: where the plan came from
    messages: list[str] = field(default_factory=list)
    probe: ProbeResult | None = None
    # the trials the plan was chosen from (the probe's, or the saved plan's): the plan line says the
    # lever combinations an error that is not out of memory stopped (render.plan_line)
    trials: list = field(default_factory=list)


def _apply_plan(cfg, plan: PlanRecord):
    cfg = cfg.model_copy(deep=True)
    cfg.dtype = plan.dtype
    cfg.compile = plan.compile
    cfg.checkpointing = plan.checkpointing
    # the plan's policy (a plan saved before the policy was a lever reads back as 'full', which is
    # what it measured); without checkpointing nothing is recomputed, and the config's stays
    if plan.checkpointing:
        cfg.checkpointing_policy = plan.checkpointing_policy
    cfg.loss_impl = plan.loss_impl
    if plan.world_size > 1:
        cfg.parallelism = plan.parallelism
    return cfg


def _profile_recorder(name: str, fp: str, log: Callable[[str], None], run: str = ""):
    """on_event writing a run's lessons to plan `fp` of `name`, dated (step, size failed, `run`: --out)."""
    master = agree.ranks().master  # every rank sees the same events; rank 0 writes the profile

    def on_event(ev: dict) -> None:
        if not master:
            return
        try:
            _record(ev)
        except ProfileError as e:  # a lesson not kept must not stop the training it came from
            log(f"profile {name}: could not record this run's lesson ({e}); training goes on")

    def _record(ev: dict) -> None:
        kind = ev.get("event")
        if ev.get("injected"):  # a demo/test fault says nothing about the card: keep the profile
            log(f"profile {name}: injected OOM at step {ev['step']} not recorded as a lesson")
            return
        if ev.get("cause") == "thrash" and not ev.get("confirmed"):
            log(f"profile {name}: allocator retries rose without reserved memory near the limit; "
                f"not recorded as a lesson")
            return
        if kind in ("oom_shrink", "compile_oom_shrink"):
            # a staged run's shrink, in sequences of the plan's block size (trainer/config/stages.py)
            safe = ev.get("micro_batch_at_block_size", ev["new_micro_batch"])
            record_event(name, fp, f"step {ev['step']}: {kind} {ev['old_micro_batch']} -> {ev['new_micro_batch']} "
                                   f"({ev.get('reason', '')})", safe_micro_batch=safe, step=ev["step"], run=run,
                         failed_micro_batch=ev["old_micro_batch"])
            log(f"profile {name}: safe micro-batch is now {safe}")
        elif kind == "compile_fallback_eager":
            record_event(name, fp, f"step {ev['step']}: compile ran out of memory at micro-batch "
                                   f"{ev['micro_batch']}; eager from now on", compile_failed=True, step=ev["step"],
                         failed_micro_batch=ev["micro_batch"], run=run)
            log(f"profile {name}: compile disabled for this plan after an OOM")
    return on_event


def say_schedule(cfg, max_steps: int | None, log: Callable[[str], None], err_log: Callable[[str], None]) -> None:
    """Before any probe, where the run stops: --max-steps past max_iters in `err_log`, with the
    config's other notes (checks.say_config_notes), and one line in `log`, with the plan, for a
    run that ends inside its learning-rate warm-up (trainer.schedule.lr_at): with nanoGPT's
    default warmup_iters of 2000 a 30-step run trains at under 2 % of learning_rate, which looks
    like a broken model. Nothing when the warm-up ends in time."""
    say_config_notes(cfg, max_steps, err_log)
    end = min(cfg.max_iters, max_steps) if max_steps is not None else cfg.max_iters  # steps 0 .. end - 1 run
    if cfg.decay_lr and cfg.warmup_iters >= end:
        top = end / (cfg.warmup_iters + 1)  # lr_at(end - 1): nanoGPT's warm-up, (it + 1) / (warmup_iters + 1)
        log(f"note: the run's last step is {end - 1}, inside its {cfg.warmup_iters}-step learning-rate warm-up: "
            f"the rate reaches {top:.1%} of learning_rate (--set warmup_iters=N to shorten it)")


def prepare_run(cfg, *, profile: str | None, emulate: bool, probe_opts: ProbeOptions, max_steps: int | None,
                resume: bool, progress: bool, log: Callable[[str], None]) -> Launch:
    if profile is None:
        res, device, _ = run_probe(cfg, probe_opts, log=log)
        return _launch(cfg, device, res.plan, res.fit_sizes, res.compiled_fit_sizes,
                       source=f"probed just now on {res.device.name}; not saved (after autofit probe --save with "
                              f"these options, run --profile {profile_name_for(res.device)} starts at once)",
                       max_steps=max_steps, resume=resume,
                       progress=progress, probe=res, plan_info_extra={"source": "probe"})

    saved = load_profile(profile, builtin=_builtin_hardware)
    if saved is None:
        raise ProfileError(no_profile_words(profile))
    hw = hardware_of(profile, saved)
    emulated_on = None
    if hw.get("kind") == "cpu":
        probe_opts.device, probe_opts.budget_bytes = "cpu", int(hw["memory_bytes"])
        from autofit.devices.cpu import check_budget_fits
        check_budget_fits(probe_opts.budget_bytes, f"profile {profile}'s memory_bytes (its CPU budget)")
        device = open_device("cpu", budget_bytes=probe_opts.budget_bytes, gpu_index=probe_opts.gpu_index)
    else:
        device, emulated_on = gpu_for_profile(profile, hw, emulate, probe_opts)
        if emulated_on:
            log(f"emulating {profile} on {emulated_on}: {device.info.note}")
    info, budget = device.info, device_budget(device, probe_opts.margin)
    inputs = plan_fingerprint_inputs(cfg, info, emulated_on)
    fp = fingerprint(inputs)
    extra = {"profile": profile, "fingerprint": fp, **({"emulated_on": emulated_on} if emulated_on else {})}
    fitted = agree.from_rank0(find_plan(saved, fp))  # several ranks: rank 0's answer for all
    if fitted is not None:
        check_saved_plan(fitted.plan, cfg, agree.ranks().world_size, profile, fp)
    # several ranks: judged on the smallest rank's budget, so every rank takes the same branch (t8's
    # H1: a plan that fit rank 0's budget and not rank 1's sent rank 0 to training, rank 1 to a probe)
    low = agree.budget(budget)
    unmet = _unmet_flags(fitted.plan, cfg, device, probe_opts, low) if fitted is not None else None
    if fitted is not None and unmet is None:
        return _from_saved(cfg, device, fitted, profile, fp, max_steps=max_steps, resume=resume, progress=progress,
                           log=log, extra=extra, budget_bytes=low.budget_bytes)
    near = nearest_plan(saved, inputs)
    why = (f"the saved plan does not do what this command asks ({unmet})" if unmet else
           _for_other_ranks(near[1]) or not_reused_words(near[1]) if near else
           "no fitted plan for this config yet")
    log(f"profile {profile}: {why}; probing")
    res = probe_on(cfg, device, budget, probe_opts, log)
    words = probe_opts.search_words()
    if fitted is not None and set(fitted.searched_under) < set(words):  # the saved one searched more widely
        saved_to = f"not saved over the profile's plan, fitted under fewer search flags ({', '.join(words)} here)"
    else:
        saved_to = f"saved to {save_probe(res, cfg, name=profile, emulated_on=emulated_on, searched_under=words)[2]}"
    return _launch(cfg, device, res.plan, res.fit_sizes, res.compiled_fit_sizes,
                   source=f"probed just now ({why}); {saved_to} as {fp}", max_steps=max_steps,
                   resume=resume, progress=progress, probe=res, on_event=_profile_recorder(profile, fp, log, cfg.out_dir),
                   plan_info_extra={"source": "probe", **extra})


def _from_saved(cfg, device, fitted: FittedPlan, profile: str, fp: str, *, max_steps, resume, progress, log,
                extra: dict, budget_bytes: int) -> Launch:
    """The launch of a saved plan that matches: lowered to the profile's safe micro-batch and compile
    off where earlier runs learned so, with the figures of what it then runs, against this run's budget."""
    notes = lesson_notes(fitted, fitted.plan.micro_batch, fitted.plan.compile, profile)  # each with how to clear it
    plan, same = run_plan(fitted, cfg, device.info.kind)  # lowered where lessons say, as profiles show lists it
    plan = plan.model_copy(deep=True, update={"budget_bytes": budget_bytes})
    fit_sizes = sorted({t.micro_batch for t in same if not t.compile})
    compiled = sorted({t.micro_batch for t in same if t.compile})
    if fitted.searched_under:  # the best of a narrower search: said, so a wider one is one probe away
        notes.append(f"fitted under {', '.join(fitted.searched_under)} only (probe again without them to search "
                     f"every lever)")
    src = (f"saved plan {fp} from profile {profile} (fitted {fitted.updated:%Y-%m-%d %H:%M} UTC); no probe needed"
           + ("; " + "; ".join(notes) if notes else ""))
    return _launch(cfg, device, plan, fit_sizes, compiled, source=src, max_steps=max_steps, resume=resume,
                   progress=progress, on_event=_profile_recorder(profile, fp, log, cfg.out_dir),
                   plan_info_extra={"source": "profile", **extra}, trials=fitted.trials)


def _unmet_flags(plan: PlanRecord, cfg, device, opts: ProbeOptions, budget) -> str | None:
    """Why a saved plan does not do what this command asks, or None: a lever flag it breaks
    (--dtype, --compile/--no-compile, --checkpointing, --checkpointing-policy, --loss: a probe with
    them would not have chosen it), or its peak above this run's budget (--margin). The flags are
    read as a probe reads them (candidate_space), so a bad one is refused here too. Raises PlanError."""
    from autofit.units import fmt_bytes
    why = []
    if opts.search_words():  # a lever flag given: the space a probe with it would search
        space = probe_space(cfg, device, opts)
        if plan.dtype not in space.dtypes:
            why.append(f"it trains in {plan.dtype}, not {', '.join(space.dtypes)}")
        if plan.compile not in space.compile:
            why.append(f"compile is {'on' if plan.compile else 'off'} in it")
        if plan.checkpointing not in space.checkpointing or (
                plan.checkpointing and plan.checkpointing_policy not in space.checkpointing_policies):
            why.append(f"its activation checkpointing is {plan.checkpointing} ({plan.checkpointing_policy})")
        if plan.loss_impl not in space.loss_impls:
            why.append(f"its loss is {plan.loss_impl}")
    peak = judged_peak(plan) or plan.estimated_peak_bytes  # reserved where measured on CUDA
    if peak and peak > budget.budget_bytes:
        why.append(f"its peak {fmt_bytes(peak)} is above this run's {fmt_bytes(budget.budget_bytes)} budget")
    return "; ".join(why) or None


def _launch(cfg, device, plan: PlanRecord, fit_sizes, compiled_fit_sizes, *, source: str, max_steps, resume,
            progress, probe=None, on_event=None, plan_info_extra=None, trials=None) -> Launch:
    run_cfg = _apply_plan(cfg, plan)
    plan_info = {**plan.model_dump(mode="json"), **(plan_info_extra or {}), "description": source,
                 "fit_sizes": sorted(fit_sizes), "compiled_fit_sizes": sorted(compiled_fit_sizes)}
    if device.torch_device.type == "cuda":  # measured: what the plan's "allocator" fingerprint field asked for
        plan_info["allocator_state"] = device.allocator_state()
    opts = RunOptions(micro_batch=plan.micro_batch, compile_after=plan.compile_after,
                      compiled_fit_sizes=list(compiled_fit_sizes), shrink=shrink_policy(fit_sizes),
                      on_event=on_event, plan_info=plan_info, max_steps=max_steps, resume=resume,
                      meter=device, device=device.torch_device, progress=progress)
    return Launch(cfg=run_cfg, opts=opts, device=device, plan=plan, source=source, probe=probe,
                  trials=list(trials if trials is not None else getattr(probe, "trials", [])))
