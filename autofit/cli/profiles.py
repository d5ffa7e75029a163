"""`autofit profiles list | show | rm | add`: the saved per-GPU profiles, from the command line.

Thin like the rest of the CLI: parse, call autofit.profiles.store / autofit.devices.hardware, print. On a
terminal the listings are rich tables; piped (stdout not a TTY) they are tab-separated lines, so
no path or name is ever cut or wrapped and scripts can split them.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Optional

import typer

profiles_app = typer.Typer(help="Saved per-GPU profiles: list, show, remove, add your own GPU.",
                           no_args_is_help=True)


def _console():
    from autofit.cli.common import console  # created there, once, for every command
    return console


def _fmt(n) -> str:
    from autofit.units import fmt_bytes
    return fmt_bytes(n) if n else "-"


def print_rows(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on a terminal; tab-separated lines (headers first) when piped."""
    console = _console()
    if not console.is_terminal:
        for line in [headers, *rows]:
            print("\t".join(cell.replace("\t", " ") for cell in line))  # plain: rich would expand tabs
        return
    from rich.table import Table
    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@profiles_app.command("list")
def profiles_list(as_json: bool = typer.Option(False, "--json", help="Print only JSON.")):
    """Built-in and saved profiles."""
    from autofit.devices.hardware import load_builtin
    from autofit.devices.hardware import builtin_hardware as _builtin_hardware  # no torch
    from autofit.profiles.manage import list_profiles
    entries = list_profiles(sorted(load_builtin()), builtin=_builtin_hardware)
    if as_json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return
    rows = [[e.name, e.gpu, _fmt(e.memory_bytes), str(e.n_plans), e.location + (f" ({e.error})" if e.error else "")]
            for e in entries]
    print_rows(["name", "GPU", "memory", "fitted plans", "where"], rows)


def _hardware_line(name: str, hw: dict) -> str:
    mem = hw.get("memory_bytes")
    parts = [f"{name}: {hw.get('gpu', '?')}", _fmt(mem) if isinstance(mem, int) else "?"]
    if hw.get("compute_capability"):
        parts.append(f"compute capability {'.'.join(map(str, hw['compute_capability']))}")
    if hw.get("peak_bf16_tflops"):
        parts.append(f"peak dense bf16 {hw['peak_bf16_tflops']} TFLOP/s")
    if hw.get("peak_fp16_tflops"):
        parts.append(f"peak dense fp16 {hw['peak_fp16_tflops']} TFLOP/s")
    if hw.get("sustained_tflops"):  # what the card holds under its power limit, where well below the peak
        parts.append(f"sustained dense fp16 {hw['sustained_tflops']} TFLOP/s")
    if hw.get("memory_bandwidth_gbs"):
        parts.append(f"{hw['memory_bandwidth_gbs']} GB/s")
    return ", ".join(parts) + " (figures from the profile, not measured)" * bool(hw.get("peak_fp16_tflops"))


def _as_run(fitted, cpu: bool):
    """The plan `run --profile` runs of the saved `fitted` (launch.lowered.run_plan, the helper the
    run launches it with: lowered by lessons, with that size's own figures), and the words that give
    the saved plan beside it ('saved 32 = 32 × 1; lowered to 16 by a lesson of 2026-12-05 20:34 UTC')."""
    from types import SimpleNamespace

    from autofit.launch.lowered import run_plan
    cfg = SimpleNamespace(**{"ce_chunk_size": None, **fitted.config_summary})  # TOML drops a None
    p, _ = run_plan(fitted, cfg, "cpu" if cpu else "cuda")
    saved, said = fitted.plan, []
    if p.micro_batch != saved.micro_batch:
        said.append(f"saved {saved.split}; lowered to {p.micro_batch} by a lesson of "
                    f"{_lesson_date(fitted.safe_micro_batch_lesson)}")
    if p.compile != saved.compile:
        said.append(f"saved with compile on; off by a lesson of {_lesson_date(fitted.compile_failed_lesson)}")
    return p, said


def _lesson_date(lesson) -> str:
    return f"{lesson.learned:%Y-%m-%d %H:%M} UTC" if lesson is not None else "an unknown date (an older autofit's)"


# Fingerprinted config fields (autofit.profiles.fingerprints) the config cell names where they are
# off their default; the model's shape, vocabulary and batch are in it already, the plan's own
# levers in their columns, and the config's batch_size / accumulation split is the plan's to choose.
OFF_DEFAULT_FIELDS = ("bias", "dropout", "ce_chunk_size", "dtype", "compile", "compile_scope", "tf32",
                      "checkpointing", "loss_impl")


def _varying(plans) -> set[str]:
    """The OFF_DEFAULT_FIELDS whose values differ among a profile's plans: the ones that tell its
    rows apart (t8: every tiny-preset row repeated 'dtype=float32, compile=False')."""
    return {k for k in OFF_DEFAULT_FIELDS if len({repr(p.config_summary.get(k)) for p in plans}) > 1}


def _plan_row(fp: str, fitted, cpu: bool = False, vary: set[str] | None = None) -> list[str]:
    """One plan as `run --profile` would run it, the saved plan beside it where a lesson changed it."""
    from trainer.errors import counted  # '1 layer, 1 head', not '1 layers'
    c = fitted.config_summary
    p, changed = _as_run(fitted, cpu)
    config = (f"{counted(c.get('n_layer'), 'layer')}, {counted(c.get('n_head'), 'head')}, n_embd {c.get('n_embd')}, "
              f"block {c.get('block_size')}, vocab {c.get('vocab_size')}, batch {p.effective_batch * p.world_size}")
    # fingerprinted fields off TrainConfig's default (those that differ among the profile's plans):
    # plans that differed only in dropout or ce_chunk_size printed as the same row (t7's M10)
    from trainer.config.train_config import TrainConfig
    config += "".join(f", {k}={c[k]}" for k in OFF_DEFAULT_FIELDS if k in c and (
        k in vary if vary is not None else c[k] != TrainConfig.model_fields[k].default))
    config += ", staged" if c.get("stages") else ""
    # today's model options where set (config_summary keeps only those): plans for a ReLU²+Muon and a
    # SwiGLU+AdamW model of one shape read the same without them (t3, session 12)
    from trainer.config.model_options import MODERN_DEFAULTS
    config += "".join(f", {k}={c[k]}" for k in MODERN_DEFAULTS if k in c)
    notes = list(changed)
    if fitted.safe_micro_batch and fitted.safe_micro_batch >= fitted.plan.micro_batch:  # no effect on this plan
        notes.append(f"safe micro-batch {fitted.safe_micro_batch}")
    if fitted.compile_failed and not fitted.plan.compile:
        notes.append("compile failed at run time")
    notes += fitted.events[-2:]
    compile_txt = f"on after {p.compile_after} steps" if p.compile else "off"
    ckpt = f"every {p.checkpointing} block{'s' * (p.checkpointing != 1)}, {p.checkpointing_policy}" if p.checkpointing else "off"
    per_rank = " per rank" if p.world_size > 1 else ""  # a trial's tokens/s is one rank's (the slowest)
    tps = _tokens_per_s_words(p, per_rank)
    ranks = f"; {p.world_size} ranks, {p.parallelism}, each" if p.world_size > 1 else ""  # torchrun plans
    # the split as it runs ('32 = 11 × 2 + 10'): 'micro x accum' read 11 x 3 = 33 for an uneven one
    return [fp, config, f"{p.split}{ranks}", p.dtype, compile_txt, ckpt, p.loss_impl,
            _fmt(p.measured_peak_bytes) + (f" ({_fmt(p.measured_reserved_bytes)} reserved)"
                                           if p.measured_reserved_bytes else ""), tps, f"{fitted.updated:%Y-%m-%d %H:%M}", "; ".join(notes)]


def _tokens_per_s_words(p, per_rank: str) -> str:
    """A plan's tokens/s cell: '1,890 per rank (measured median step; fastest 2,030)', '5,150 (estimated)'.
    The median is what a run sees; the fastest step is the undisturbed figure the contest compared
    (measured plans since session 14). An older plan's figure is its fastest step's, said as 'measured'."""
    if not p.tokens_per_s:
        return "-"
    if p.mode != "measured" or not p.fastest_tokens_per_s:
        return f"{p.tokens_per_s:,.0f}{per_rank} ({p.mode})"
    return f"{p.tokens_per_s:,.0f}{per_rank} (measured median step; fastest {p.fastest_tokens_per_s:,.0f})"


@profiles_app.command("show")
def profiles_show(name: str, as_json: bool = typer.Option(False, "--json", help="Print only JSON.")):
    """Hardware and fitted plans of one profile."""
    from autofit.devices.hardware import builtin_hardware as _builtin_hardware  # no torch
    from autofit.profiles.store import ProfileError, load_profile
    prof = load_profile(name, builtin=_builtin_hardware)
    if prof is None:
        raise ProfileError(f"no profile named {name!r}; see autofit profiles list")
    hw = prof.hardware or {}
    cpu = hw.get("kind") == "cpu" or name.startswith("cpu-")  # cpu-* names are the budgeted CPU's
    if as_json:  # each plan's 'runs_as': what run --profile runs of it (lowered by lessons), or the plan itself
        data = prof.model_dump(mode="json")
        for fp, fitted in prof.plans.items():
            data["plans"][fp]["runs_as"] = _as_run(fitted, cpu)[0].model_dump(mode="json")
        print(json.dumps(data, indent=2))
        return
    console = _console()
    console.print(_hardware_line(prof.name, hw), soft_wrap=True, markup=False, highlight=False)
    if hw.get("source"):
        console.print(f"  source: {hw['source']}", soft_wrap=True, markup=False, highlight=False)
    if not prof.plans:
        # a CPU profile (cpu-* names are the budgeted CPU's: profiles add refuses them) is a budget, not a card
        here = "" if cpu else " on this card"
        console.print(f"  no fitted plans yet (autofit probe --save, or autofit run --profile {name}{here})")
        return
    headers = ["fingerprint", "config", "micro-batches", "dtype", "compile", "checkpointing", "loss",
               "measured peak", "tokens/s", "fitted (UTC)", "notes"]
    vary = _varying(prof.plans.values())  # only what tells this profile's plans apart
    print_rows(headers, [_plan_row(fp, fitted, cpu, vary) for fp, fitted in prof.plans.items()])


@profiles_app.command("rm")
def profiles_rm(name: str, plan: Optional[str] = typer.Option(None, "--plan", help="Remove only this plan: its fingerprint, or at least its first 4 characters if no other plan shares them."),
                lessons: bool = typer.Option(False, "--lessons", help="Remove only what runs learnt (a micro-batch lowered by a run-time OOM, compile off) from the plan, or from every plan without --plan; the plans stay.")):
    """Remove a saved profile, one plan of it, or the lessons runs taught its plans."""
    from autofit.devices.hardware import load_builtin
    from autofit.profiles.manage import remove_profile
    _console().print(remove_profile(name, plan, builtin_names=sorted(load_builtin()), lessons=lessons),
                     soft_wrap=True, markup=False, highlight=False)


def _compute_capability(text: str) -> list[int]:
    """--compute-capability as [major, minor]; UsageError for text that is not MAJOR.MINOR in ASCII
    digits, or one no CUDA card has (checked here, before the bf16 check that 99.99 met first)."""
    import re

    from autofit.cli.common import UsageError
    from autofit.devices.hardware import compute_capability_problem
    m = re.fullmatch(r"([0-9]+)\.([0-9]+)", text.strip())  # str.isdigit took Arabic-Indic digits too
    if m is None:
        raise UsageError(f"--compute-capability takes MAJOR.MINOR, e.g. 7.5, got {text!r}")
    cc = [int(m.group(1)), int(m.group(2))]
    if (problem := compute_capability_problem(cc)) is not None:
        raise UsageError(f"--compute-capability: {problem}")
    return cc


@profiles_app.command("add")
def profiles_add(
        name: str = typer.Argument(..., help="Profile name: model slug + memory, e.g. gtx1650-4gb."),
        memory: str = typer.Option(..., "--memory", help="Memory capacity, e.g. 4GiB (NVML's total if you know it)."),
        compute_capability: str = typer.Option(..., "--compute-capability", help="CUDA compute capability, e.g. 7.5."),
        peak_fp16: float = typer.Option(..., "--peak-fp16-tflops", help="Peak dense fp16 tensor TFLOP/s (FP32 accumulate)."),
        peak_bf16: Optional[float] = typer.Option(None, "--peak-bf16-tflops", help="Peak dense bf16 TFLOP/s; omit if the card has no bf16 (compute capability < 8.0)."),
        bandwidth: float = typer.Option(..., "--bandwidth-gbs", help="Memory bandwidth in GB/s (decimal), from the spec sheet."),
        sustained: Optional[float] = typer.Option(None, "--sustained-tflops", help="Dense fp16 tensor TFLOP/s the card holds under its power limit, measured, where well below the peak (a 70 W T4); omit where the peak holds."),
        gpu: Optional[str] = typer.Option(None, "--gpu", help="Marketing name as NVML reports it, e.g. 'NVIDIA GeForce GTX 1650' (default: the profile's earlier one, else NAME)."),
        source: Optional[str] = typer.Option(None, "--source", help="Where the figures come from (default: 'user-defined')."),
):
    """Describe a GPU autofit has no built-in profile for; then `probe --gpu NAME` and `run --profile NAME` take it like a built-in one."""
    from autofit.cli.common import UsageError
    from pydantic import ValidationError

    from autofit.devices.hardware import HardwareSpec, load_builtin
    from autofit.profiles.store import check_profiles_writable, save_hardware
    if not _name_ok(name):
        raise UsageError(f"profile name {name!r} must be a model slug and its memory, e.g. gtx1650-4gb "
                         "(lowercase letters, digits and dots, '-', then NNgb or NNmb)")
    if name.startswith("cpu-"):  # a later probe --device cpu --save would write a CPU's over this card
        raise UsageError(f"profile name {name!r}: cpu-* names are the budgeted CPU device's, which probe --device "
                         f"cpu --save writes; name the card (e.g. gtx1650-4gb)")
    mem_bytes = _memory_bytes(name, memory)
    cc = _compute_capability(compute_capability)
    if peak_bf16 is None and tuple(cc) >= (8, 0):  # the estimate prices bf16 there from this figure
        raise UsageError(f"--peak-bf16-tflops: compute capability {compute_capability} has bf16 tensor cores; "
                         f"give its dense bf16 TFLOP/s from the spec sheet")
    if sustained is not None and sustained > peak_fp16:  # the peak is a ceiling: what it holds cannot exceed it
        raise UsageError(f"--sustained-tflops {sustained:g} is above --peak-fp16-tflops {peak_fp16:g}: give what the "
                         f"card holds under its power limit, or omit it where the peak holds")
    check_profiles_writable(name)
    # Without --gpu the card's name is unknown: NAME is a slug, which NVML never reports, so it is
    # no NVML name (a card here matches by its slug, hardware.match_hardware) and the label says so.
    label = f"{name} (no --gpu name given)" if gpu is None else gpu  # --gpu '' is refused (HardwareSpec)
    kept = _earlier_gpu(name) if gpu is None else None  # t9's M2: re-adding to correct a figure kept no name
    if kept is not None:
        gpu = label = kept
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    hardware = {"schema_version": 1, "name": name, "gpu": label, "nvml_names": [] if gpu is None else [gpu],
                "memory_bytes": mem_bytes, "compute_capability": cc,
                "bf16": peak_bf16 is not None, "peak_bf16_tflops": peak_bf16, "peak_fp16_tflops": peak_fp16,
                "sustained_tflops": sustained, "memory_bandwidth_gbs": bandwidth,
                "source": source if source is not None
                else f"user-defined with autofit profiles add ({stamp}); figures not checked"}
    try:
        spec = HardwareSpec.model_validate(hardware)
    except ValidationError as e:  # one line that names the flag, not the model's field
        err = e.errors()[0]
        flag = _FLAGS.get(str(err["loc"][0]) if err["loc"] else "", "profiles add")
        raise UsageError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None
    path, new = save_hardware(name, spec.model_dump(mode="json", exclude_none=True))
    note = " (overrides the built-in profile of that name)" if name in load_builtin() else ""
    if kept is not None:
        note += f" (kept its GPU name {kept!r}; give --gpu to change it)"
    _console().print(f"{'wrote' if new else 'updated the hardware of'} {path}{note}; "
                     f"estimate with: autofit probe --gpu {name}", soft_wrap=True, markup=False, highlight=False)


def _memory_bytes(name: str, memory: str) -> int:
    """--memory in bytes. Raises UsageError for a size that is not one, one above what reading a
    profile accepts (1 PiB: t9's M1, written and then refused on every read), or one the name
    does not say."""
    from autofit.cli.common import UsageError, _size
    from autofit.profiles.hardware_table import MAX_MEMORY_BYTES
    mem_bytes = _size(memory, "--memory")
    if mem_bytes > MAX_MEMORY_BYTES:
        raise UsageError(f"--memory: at most {MAX_MEMORY_BYTES / 2**50:g} PiB (no card has more), got {memory}")
    if (said := _name_memory_mismatch(name, mem_bytes)) is not None:
        raise UsageError(said)
    return mem_bytes


def _earlier_gpu(name: str) -> str | None:
    """The NVML name profile `name`'s file already holds (an earlier `profiles add --gpu`), else
    None (no file, none given then, or a file that cannot be read: save_hardware says so)."""
    from autofit.profiles.files import ProfileError
    from autofit.profiles.store import load_profile
    try:
        profile = load_profile(name)
    except ProfileError:
        return None
    names = (profile.hardware or {}).get("nvml_names") if profile is not None else None
    return names[0] if names else None


# HardwareSpec fields as the flags that set them, for one-line errors.
_FLAGS = {"memory_bytes": "--memory", "compute_capability": "--compute-capability",
          "peak_bf16_tflops": "--peak-bf16-tflops", "peak_fp16_tflops": "--peak-fp16-tflops",
          "memory_bandwidth_gbs": "--bandwidth-gbs", "sustained_tflops": "--sustained-tflops", "gpu": "--gpu", "nvml_names": "--gpu", "source": "--source",
          "name": "NAME"}


def _name_memory_mismatch(name: str, memory_bytes: int) -> str | None:
    """The one-line refusal when a profile's name says another memory than --memory, else None.
    Names round as vendors do (a 't4-16gb' has 15 GiB, an 'l4-24gb' 22.5 GiB, an 'h200-141gb'
    140.4 GiB): within 10 % of the size in GiB or in GB (decimal) is the same card."""
    import re

    from autofit.units import fmt_bytes
    m = re.search(r"-(\d+)(gb|mb)$", name)
    if m is None or memory_bytes <= 0:
        return None
    said = float(m.group(1)) * (2**30 if m.group(2) == "gb" else 2**20)
    decimal = float(m.group(1)) * (1e9 if m.group(2) == "gb" else 1e6)
    if said > 0 and min(abs(memory_bytes - said) / said, abs(memory_bytes - decimal) / decimal) <= 0.10:
        return None
    # below 1 MiB no card exists to name: the size to correct is --memory's ('e.g. 0mb' said t2)
    suffix = f"{round(memory_bytes / 2**30)}gb" if memory_bytes >= 2**30 else \
        f"{round(memory_bytes / 2**20)}mb" if memory_bytes >= 2**20 else "4gb, for a 4 GB card"
    return (f"profile name {name!r} says {m.group(1)} {m.group(2).upper()} but --memory is "
            f"{fmt_bytes(memory_bytes)}: name it for its memory (model slug, then e.g. {suffix}) or correct --memory")


def _name_ok(name: str) -> bool:
    import re
    from autofit.devices.hardware import HardwareSpec
    pattern = next(m.pattern for m in HardwareSpec.model_fields["name"].metadata if hasattr(m, "pattern"))
    return re.fullmatch(pattern, name) is not None
