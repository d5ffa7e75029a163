"""The `autofit` command. Thin: parse arguments, call the modules, render. Errors a user can
cause end in one line on stderr and exit code 2; nothing already written is lost."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="OOM-aware launcher for nanoGPT-style GPT training: measure what fits, plan, train.")
console = Console()
err_console = Console(stderr=True)


class UsageError(ValueError):
    """Bad combination of command-line options."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user can fix this': one line, no traceback."""
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.loop import TrainError
    errors: list[type[BaseException]] = [UsageError, ConfigError, DataError, TrainError]
    for mod, name in (("autofit.devices", "DeviceError"), ("autofit.hardware", "HardwareError"),
                      ("autofit.profiles", "ProfileError"), ("autofit.planner", "PlanError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def load_train_config(config: Optional[Path], preset: Optional[str], overrides: List[str]):
    from trainer.config import load_config
    if preset is None and config is None:
        preset = "tiny"  # the built-in default: small enough to train on a laptop CPU in minutes
    return load_config(preset=preset, config_file=config, overrides=overrides)


ConfigOpt = typer.Option(None, "--config", "-c", help="TOML or nanoGPT-style .py config (parsed, never executed).")
PresetOpt = typer.Option(None, "--preset", help="Built-in preset: tiny, gpt2-124m, rtx4070-seed.")
SetOpt = typer.Option([], "--set", "-s", help="Override a config key: --set key=value (repeatable).")


@app.command("config")
def config_cmd(config: Optional[Path] = ConfigOpt, preset: Optional[str] = PresetOpt,
               overrides: List[str] = SetOpt,
               as_json: bool = typer.Option(False, "--json", help="Print only JSON.")):
    """Print the resolved training config."""
    cfg = load_train_config(config, preset, overrides)
    data = cfg.model_dump(mode="json")
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        from rich.table import Table
        t = Table("key", "value", title="resolved TrainConfig")
        for k, v in data.items():
            t.add_row(k, repr(v))
        console.print(t)
        console.print(f"effective batch: {cfg.effective_batch} sequences = {cfg.tokens_per_step:,} tokens per optimizer step")


@app.command("run")
def run_cmd(config: Optional[Path] = ConfigOpt, preset: Optional[str] = PresetOpt,
            overrides: List[str] = SetOpt,
            max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after optimizer step N (the LR schedule still follows max_iters)."),
            out: Optional[Path] = typer.Option(None, "--out", help="Output directory (checkpoints, metrics.jsonl)."),
            resume: bool = typer.Option(False, "--resume", help="Continue from <out>/ckpt.pt."),
            no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
            ):
    """Train. With no arguments: the default for this machine (the tiny preset; on the CPU when there is no GPU)."""
    from trainer.loop import RunOptions, train
    cfg = load_train_config(config, preset, overrides)
    if out is not None:
        cfg.out_dir = str(out)
    if max_steps is not None and max_steps < 0:
        raise UsageError("--max-steps must be >= 0")
    opts = RunOptions(max_steps=max_steps, resume=resume, progress=not no_progress)
    result = train(cfg, opts)
    _report_run(result, cfg)


def _report_run(result, cfg) -> None:
    if result.status == "interrupted":
        err_console.print(f"interrupted after step {result.steps}; checkpoint saved to {result.checkpoint}; "
                          f"continue with --resume --out {cfg.out_dir}")
        raise typer.Exit(130)
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (None, None)
    msg = f"done: {result.steps} optimizer steps"
    if first is not None:
        msg += f", loss {first:.3f} -> {last:.3f}"
    console.print(msg + f"; checkpoint {result.checkpoint}, metrics {Path(cfg.out_dir) / 'metrics.jsonl'}")


def main() -> None:
    errors = _user_errors()
    try:
        app()
    except errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"autofit: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("autofit: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
