"""What every `autofit` sub-command shares: the consoles, the one-line user errors, the config
options (and the probe options probe and run share), small parsers, and the `autofit run` line a
probe suggests. The commands live in app.py (config, probe, run), profiles.py (profiles) and
data.py (data prepare, sample)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from trainer.config.presets import PRESETS  # names only: no torch, no pydantic

# What stands in for the characters autofit prints where the output's encoding cannot write them.
_ASCII = {"\u00d7": "x", "\u2026": "...", "\u2014": "-", "\u2013": "-", "\u2212": "-", "\u2248": "~", "\u2192": "->",
          "\u2190": "<-", "\u2265": ">=", "\u2264": "<=", "\u00b7": ".", "\u2022": "*", "\u2713": "ok", "\u2717": "x",
          "\u2588": "#", "\u2591": ".", "\u2592": ":", "\u2593": "#", "\u00b1": "+/-", "\u25a0": "#"}


def _ascii_stand_in(err: UnicodeEncodeError) -> tuple[str, int]:
    return "".join(_ASCII.get(c, "?") for c in err.object[err.start:err.end]), err.end


def encodable_streams() -> None:
    """stdout and stderr that cannot encode what autofit prints (LC_ALL=C, PYTHONIOENCODING=ascii,
    a Latin-1 terminal) write ASCII stand-ins ('512 = 27 x 18 + 26') instead of raising
    UnicodeEncodeError in the middle of the plan; a UTF-8 stream is left as it is."""
    import codecs
    codecs.register_error("autofit-ascii", _ascii_stand_in)
    for stream in (sys.stdout, sys.stderr):
        try:
            "\u00d7\u2500\u2026".encode(getattr(stream, "encoding", None) or "utf-8")
        except (UnicodeEncodeError, LookupError):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="autofit-ascii")


encodable_streams()  # before the consoles: rich picks its box characters from the stream's encoding

# Piped output (CI logs, `| less`, a file) is not wrapped: lines are soft-wrapped (left whole for
# the reader's pager), and tables get 200 columns instead of rich's default 80.
# (A closed stdout, `>&-`, is None here; cli.app.main refuses it in one line.)
_tty = sys.stdout is not None and sys.stdout.isatty()
console = Console(width=None if _tty else 200, soft_wrap=not _tty)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200, soft_wrap=not sys.stderr.isatty())


def _no_bool_metavar() -> None:
    """typer's rich help prints a type for every option, so flags read `--json <bool>` and
    `--help <bool>` as if they took a value. Flags take none: show no type for them."""
    from typer import core
    plain = getattr(core.TyperOption, "display_type_rich", None)
    if plain is None:  # typer 0.27 (the H200 image's) has no such hook: leave its help as it is
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else plain(self, ctx)
    core.TyperOption.display_type_rich = display_type_rich


_no_bool_metavar()


def _wide_piped_help() -> None:
    """typer renders --help at rich's default 80 columns when piped, where its option table cuts
    long flag names ('--checkpointing-pol…': t7's M5, through `| less` or a CI log). Piped help
    gets 100 columns, the narrowest at which every flag name is whole (90 was, 80 is not), so its
    boxes still fit a pager (a terminal narrower than that still cuts: typer's table)."""
    if _tty or os.environ.get("TERMINAL_WIDTH") or not {"--help", "-h"} & set(sys.argv[1:]):
        return
    from typer import rich_utils
    rich_utils.MAX_WIDTH = 100


_wide_piped_help()


class UsageError(ValueError):
    """Bad combination of command-line options."""


# Exception types that mean 'the user can fix this': one line, no traceback. Matched by class
# name along the exception's MRO (classes of autofit and trainer only), so that catching them
# imports nothing (trainer.loop would import torch, ~2 s, even for `autofit config`) and a class
# moving between modules keeps working.
USER_ERRORS = frozenset({
    "UsageError", "ConfigError", "DataError", "TrainError", "DeviceError", "HardwareError", "ProfileError",
    "PlanError", "PlotError", "WeightsError", "CheckpointError", "SampleError",
    "PathProblem",
})


def _is_user_error(e: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS and c.__module__.split(".")[0] in ("autofit", "trainer", "__main__")
               for c in type(e).__mro__)


def user_message(e: BaseException) -> str | None:
    """The one line for an error the user can fix, or None (a bug: the traceback is shown).
    Besides USER_ERRORS: `import torch` itself failing, which the environment decides
    (TORCH_LOGS=garbage is a ValueError from torch's own __init__, a broken install an
    ImportError); its message's first sentence is the line."""
    if _is_user_error(e):
        return _bytes_shown(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
    tb, in_torch_init = e.__traceback__, False
    while tb is not None:
        code = tb.tb_frame.f_code
        in_torch_init |= code.co_name == "<module>" and Path(code.co_filename).parts[-2:] == ("torch", "__init__.py")
        tb = tb.tb_next
    if not in_torch_init:
        return None
    said = " ".join(line.strip() for line in str(e).strip().splitlines())
    first = said.split(". ")[0][:300] or type(e).__name__  # the first sentence: TORCH_LOGS's lists every name
    return f"torch could not be imported: {first} (check the TORCH_* environment variables and the torch install)"


def _bytes_shown(line: str) -> str:
    """A path's bytes that are not UTF-8 as \\xNN (b'\\xfe.py' reads '\\xfe.py'), not as the
    surrogates Python decodes them to ('\\udcfe.py' on a stderr that escapes them)."""
    try:
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte: left to stderr's own escaping
        return line


def load_train_config(config: Optional[Path], preset: Optional[str], overrides: List[str]):
    """The TrainConfig of a command: a preset or a file (the tiny preset when neither is named),
    then --set; with init_from = 'gpt2*' the published model's shape, as nanoGPT's train.py takes
    it. Raises UsageError for --preset with --config: both name a whole model, and a quiet
    winner would train something the user did not pick; ConfigError for a bad config."""
    from trainer.config.train_config import load_config
    if preset is not None and config is not None:
        raise UsageError(f"--preset and --config both name a model; pick one (to change a preset's values, "
                         f"use --preset {preset} --set key=value, or copy them into {config})")
    if preset is None and config is None:
        preset = "tiny"  # the built-in default: small enough to train on a laptop CPU in minutes
    cfg = load_config(preset=preset, config_file=config, overrides=overrides)
    if not str(cfg.init_from).startswith("gpt2"):
        return cfg  # `config` and the like need no torch (trainer.model.pretrained loads it)
    from trainer.model.pretrained import gpt2_config
    return gpt2_config(cfg)


ConfigOpt = typer.Option(None, "--config", "-c", help="TOML or nanoGPT-style .py config (parsed, never executed).")
PresetOpt = typer.Option(None, "--preset", help=f"Built-in preset: {', '.join(PRESETS)}.")
SetOpt = typer.Option([], "--set", "-s", help="Override a config key: --set key=value (repeatable).")


def _size(value: Optional[str], flag: str) -> Optional[int]:
    """Bytes of a size flag; UsageError (one line) for junk, and for a bare number under 1 MiB
    (autofit.units.missing_unit: `--budget 2` meant 2 GiB, not 2 bytes)."""
    if value is None:
        return None
    from autofit.units import missing_unit, parse_size
    try:
        n = parse_size(value)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None
    if why := missing_unit(value):
        raise UsageError(f"{flag} {why}")
    return n


def _fmt(n):
    from autofit.units import fmt_bytes
    return fmt_bytes(n) if n else "-"


def device_from_config(cfg, device: str | None, budget: str | None, gpu_index: int | None,
                       several: bool = False) -> tuple[str | None, int | None, str | None]:
    """(--device, --gpu-index, where they came from) with the config's `device` ('cpu', 'cuda',
    'cuda:1') filled in where no device flag (--device, --budget, --gpu-index) was given: a flag
    beats the config, and 'auto' leaves the choice to the opener (a GPU if there is one). The
    third item names the config for the opener's errors (None: from the flags). --device cuda:N
    is --device cuda --gpu-index N. On several ranks (`several`: --nproc-per-node; or under
    torchrun) each takes the GPU of its LOCAL_RANK, so a 'cuda:N' names no index there."""
    from autofit.devices.ranks import under_torchrun
    one = not (several or under_torchrun())
    if device is not None and device.startswith("cuda:") and device[5:].isdigit() and gpu_index is None:
        return "cuda", int(device[5:]) if one else None, None
    if device is not None or budget is not None or gpu_index is not None or cfg.device == "auto":
        return device, gpu_index, None
    kind, _, idx = cfg.device.partition(":")
    return kind, int(idx) if idx and one else None, f"device {cfg.device!r} from the config; --device to choose another"


def check_no_plan_flags(opts, profile: str | None, no_plan: str | None, cfg=None) -> None:
    """A run that fits no plan (`no_plan`: '--no-probe', or 'eval_only', which trains nothing)
    trains the config as written: --profile and the probe's search flags (--dtype, --loss, ...)
    would be ignored, so they are refused in one line (UsageError), naming the --set that does it;
    so is a --no-probe `cfg` whose checkpointing_policy 'selective' has no checkpointed block to
    keep anything of (checkpointing 0), as --checkpointing-policy with --checkpointing 0 is."""
    if no_plan is None:
        return
    if no_plan == "--no-probe" and cfg is not None and cfg.checkpointing_policy == "selective" and not cfg.checkpointing:
        # with a probe the config's policy is one contender's and both are searched (README); here it is the run's
        raise UsageError(f"checkpointing_policy 'selective' ({cfg.source_of('checkpointing_policy')}) applies to "
                         f"checkpointed blocks, and checkpointing 0 ({cfg.source_of('checkpointing')}) checkpoints "
                         f"none: drop one (or --set checkpointing=1)")
    if profile is not None:
        raise UsageError(f"{no_plan} and --profile exclude each other")
    flags = opts.search_flags()
    if flags:
        raise UsageError(f"{', '.join(flags)} with {no_plan}: these choose among the probe's candidates, and "
                         f"{no_plan} trains the config as written; set its values with --set (e.g. --set dtype=bfloat16 "
                         f"--set loss_impl=chunked --set checkpointing=1), or drop {no_plan}")


def _probe_options(device, budget, gpu, gpu_index, margin, dtype, compile, checkpointing, loss, policy=None,
                   device_source=None):
    from autofit.launch.probe import ProbeOptions
    if not 0.0 <= margin < 1.0:
        raise UsageError(f"--margin must be in [0, 1), got {margin}")
    ck = None
    if checkpointing is not None:
        try:
            ck = sorted({int(v) for v in checkpointing.split(",")})
            if any(v < 0 for v in ck):
                raise ValueError
        except ValueError:
            raise UsageError(f"--checkpointing takes a comma list of block intervals (0=off), got {checkpointing!r}") from None
    policies = None
    if policy is not None:
        policies = list(dict.fromkeys(v.strip() for v in policy.split(",")))  # once each, in order
        bad = [v for v in policies if v not in ("full", "selective")]
        if bad:
            raise UsageError(f"--checkpointing-policy: unknown policy {bad[0]!r} (full, selective; a comma list)")
        if ck == [0]:  # the policy is what a checkpointed block keeps: with none checkpointed it meant nothing
            raise UsageError(f"--checkpointing-policy {policy} applies to checkpointed blocks, and --checkpointing 0 "
                             f"checkpoints none: drop one (or --checkpointing 0,1 to try both)")
    li = None
    if loss is not None:
        li = list(dict.fromkeys(v.strip() for v in loss.split(",")))  # once each: a repeat is searched again
        bad = [v for v in li if v not in ("standard", "chunked")]
        if bad:
            raise UsageError(f"--loss: unknown loss implementation {bad[0]!r} (standard, chunked)")
    check_budget_source(budget)
    budget_bytes = _size(budget, "--budget")
    if budget_bytes:  # more than the machine has: refused here, before --out is made (open_device checks again)
        from autofit.devices.cpu import check_budget_fits
        check_budget_fits(budget_bytes)
    return ProbeOptions(device=device, budget_bytes=budget_bytes, gpu=gpu, gpu_index=gpu_index,
                        margin=margin, dtype=dtype, compile=compile, checkpointing=ck, loss_impls=li,
                        checkpointing_policies=policies, device_source=device_source)


def check_budget_source(budget: str | None) -> None:
    """One rule for the CPU budget's two sources: --budget is this process's (every rank's under
    torchrun), AUTOFIT_RANK_BUDGETS one per torchrun rank (a single process refuses it:
    autofit.devices.ranks.rank_budget). Both given, one would be ignored (the variable, left exported
    from a test session, replaced --budget in silence), so that is refused: UsageError, one line."""
    from autofit.devices.ranks import RANK_BUDGETS_ENV
    if budget is not None and os.environ.get(RANK_BUDGETS_ENV, "").strip():
        raise UsageError(f"--budget {budget} and {RANK_BUDGETS_ENV}={os.environ[RANK_BUDGETS_ENV].strip()} both set the "
                         f"CPU budget (the variable one per torchrun rank), and one would be ignored: drop --budget "
                         f"or unset {RANK_BUDGETS_ENV}")


DeviceOpt = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: the config's device; 'auto' there: the GPU if there is one, else the budgeted CPU).")
BudgetOpt = typer.Option(None, "--budget", help="CPU device memory budget, e.g. 2GiB; GiB/MiB and G/M are binary, GB/MB decimal, B or no unit bytes (a bare number under 1 MiB is refused as a missing unit) (default: half of available RAM, rounded down to a whole GiB, or below 2 GiB to 64 MiB).")
GpuIndexOpt = typer.Option(None, "--gpu-index", help="Which GPU: its CUDA index, as in cuda:N (CUDA_VISIBLE_DEVICES applies; default 0). Refused on the CPU and under torchrun.")
DEFAULT_MARGIN = 0.10
MarginOpt = typer.Option(DEFAULT_MARGIN, "--margin", help="Share of usable memory kept free as a safety margin, a fraction from 0 up to (not including) 1: 0.1 keeps 10 %.")
DtypeOpt = typer.Option(None, "--dtype", help="Narrow or widen dtypes: float32, bfloat16, float16, a comma list, or 'any' (default: the config's).")
CompileOpt = typer.Option(None, "--compile/--no-compile", help="Only compiled / only eager candidates (default: eager, and compiled too where the config sets compile = True).")
CkptOpt = typer.Option(None, "--checkpointing", help="Activation checkpointing intervals to try, comma list (0=off, 1=every block, k=every k-th block; default: 0, 1 and the config's checkpointing).")
CkptPolicyOpt = typer.Option(None, "--checkpointing-policy", help="What a checkpointed block keeps, policies to try: full (only its input) or selective (its matmul and attention outputs too, less recompute), comma list (default: both where torch has selective checkpointing).")
LossOpt = typer.Option(None, "--loss", help="Loss implementations to try: standard, chunked (comma list; default: both).")


def _rerun_args(config, preset, overrides, dtype, compile, checkpointing, loss, margin, gpu_index=None,
                policy=None) -> list[str]:
    """The probe's options that `autofit run --profile` takes too, as argv: the suggested command
    then trains the config that was probed, over the same candidates (and so finds its plan)."""
    args = ["--config", str(config)] if config is not None else (["--preset", preset] if preset else [])
    for item in overrides:
        args += ["--set", item]
    for flag, value in (("--dtype", dtype), ("--checkpointing", checkpointing), ("--checkpointing-policy", policy),
                        ("--loss", loss)):
        args += [flag, value] if value is not None else []
    if compile is not None:
        args.append("--compile" if compile else "--no-compile")
    if margin != DEFAULT_MARGIN:
        args += ["--margin", repr(margin)]
    if gpu_index is not None:  # the GPU that was measured
        args += ["--gpu-index", str(gpu_index)]
    return args


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_run_flags(out, max_steps, emulate, profile, budget, resume, config, preset, allow_changes=False,
                    overrides=(), nproc_per_node=None) -> None:
    """What the run's flags say wrong, in one line, before anything else is read: an empty --out,
    flags that exclude each other, and environment settings the run would read late."""
    if out is not None and not out.strip():
        raise UsageError("--out is empty: name the output folder (e.g. --out out/run1)")
    if out is not None and not _utf8(out):  # argv's undecodable bytes arrive as lone surrogates
        raise UsageError(f"--out is not valid UTF-8 ({os.fsencode(out)!r}): name the output folder in UTF-8 "
                         f"(the run's config records it as text)")
    if max_steps is not None and max_steps < 0:
        raise UsageError("--max-steps must be >= 0")
    if emulate and profile is None:
        raise UsageError("--emulate needs --profile NAME (the card to emulate)")
    if profile is not None and budget is not None:
        raise UsageError("--budget and --profile exclude each other: a profile fixes the device and its budget")
    if allow_changes and not resume:
        raise UsageError("--allow-changes goes with --resume (it lets --set change a resumed run); a new run "
                         "takes its --set values as they are: drop it")
    if out is not None and any(o.startswith("out_dir=") and o[len("out_dir="):] != out for o in overrides):
        raise UsageError("--out and --set out_dir name two folders: keep one")
    if resume and (config is not None or preset is not None or profile is not None):
        raise UsageError("--resume continues the checkpoint's own config and plan: drop --config/--preset/--profile "
                         "(use --set for what may change, e.g. --set max_iters=...)")
    from trainer.distributed.ranks import timeout as dist_timeout
    from trainer.step import FaultInjector
    try:  # the ranks the run will have: --nproc-per-node's, torchrun's WORLD_SIZE, or one process
        world = os.environ.get("WORLD_SIZE", "1").strip()
        FaultInjector.from_env(world_size=nproc_per_node or (int(world) if world.isdigit() else None))
    except ValueError as e:
        raise UsageError(str(e)) from None
    dist_timeout()  # AUTOFIT_DIST_TIMEOUT: a TrainError line now, not after the probe


def check_init_from_resume(cfg, resume: bool, preset: str | None, profile: str | None) -> None:
    """nanoGPT's init_from = 'resume' is --resume, which refuses --preset and --profile
    (check_run_flags): refused here too (a --preset's whole config was dropped without a word).
    Raises UsageError."""
    if cfg.init_from == "resume" and not resume and (preset is not None or profile is not None):
        raise UsageError(f"init_from = 'resume' continues the checkpoint's own config and plan: drop "
                         f"{'--preset' if preset is not None else '--profile'} (a config file's own values apply "
                         f"to it as changes)")


# Config keys that are also flags of some autofit commands: where another command does not take one,
# it is not a nanoGPT habit (`config --device cpu`), and the error says which commands take it.
OWN_FLAGS = {"--device": "run, probe and sample", "--dtype": "run and probe"}


def click_error_line(e, argv: list[str]) -> str:
    """click's usage error `e` as one line, with the --set or --config a nanoGPT user meant where
    the command line reads like nanoGPT's (t7's M4: `python train.py config/x.py --batch_size=32`):
    '--batch_size=32' and '--compile=False' are --set KEY=VALUE here, a bare config file is
    --config FILE; click's 'Possible options: --max-steps' for --max_iters would be another run
    (--max-steps stops early and keeps max_iters' schedule), so it is dropped there."""
    msg = e.format_message().strip()
    line = msg.splitlines()[0] if msg else type(e).__name__
    from trainer.config.train_config import TrainConfig
    opt = getattr(e, "option_name", None) or ""
    key = opt.lstrip("-").replace("-", "_")
    if key == "out_dir":  # the config's field has a flag of its own (t8)
        return f"No such option: {opt}; the run's folder is given with --out DIR"
    if opt and key in TrainConfig.model_fields:
        given = next((a for a in argv if a == opt or a.startswith(opt + "=")), opt)
        after = argv[argv.index(given) + 1: argv.index(given) + 2] if given in argv else []
        value = given.partition("=")[2] or (after[0] if after and not after[0].startswith("-") else "VALUE")
        head = f"{given}: {opt} takes no value" if "does not take a value" in line else f"No such option: {opt}"
        if opt in OWN_FLAGS:  # autofit's own flag, on other commands (t9's L1); --set only where taken (t10's L4)
            cmd = getattr(getattr(e, "ctx", None), "command", None)
            takes_set = cmd is None or any("--set" in getattr(p, "opts", ()) for p in cmd.params)
            return (f"No such option: {opt} for this command ({OWN_FLAGS[opt]} take it)"
                    + (f"; the config's key is set with --set {key}={value}" if takes_set else ""))
        return (f"{head}; a config value is set with --set {key}={value} (nanoGPT's {opt}=...)"
                + ("; --compile / --no-compile choose what the probe searches" if key == "compile" else ""))
    files = [a for a in argv if not a.startswith("-") and a.endswith((".py", ".toml")) and "=" not in a]
    if "unexpected extra argument" in line and files:
        return f"{line}; a config file is given with --config {files[0]}"
    return line


def _say_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            v = version("autofit")
        except PackageNotFoundError:  # run from a checkout that was never installed
            v = "unknown (not installed)"
        typer.echo(f"autofit {v}, checkpoint format {_checkpoint_format()}")
        raise typer.Exit()


def _checkpoint_format() -> int:
    from trainer.checkpoint.schema import CHECKPOINT_FORMAT  # imports torch: --version only
    return CHECKPOINT_FORMAT


def root(version: bool = typer.Option(False, "--version", callback=_say_version, is_eager=True,
                                      help="Print autofit's version and the checkpoint format it writes, then exit.")):
    """OOM-aware launcher for nanoGPT-style GPT training: measure what fits, plan, train.
    (`--version` exists because 'written by a newer autofit: upgrade autofit' should be checkable: t7.)"""
