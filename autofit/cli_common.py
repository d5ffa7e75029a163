"""What every `autofit` sub-command shares: the consoles, the one-line user errors, the config
options, and small parsers. The commands live in cli.py (config, probe, run), cli_profiles.py
(profiles) and cli_data.py (data prepare, sample)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

# Piped output (CI logs, `| less`, a file) is not wrapped: lines are soft-wrapped (left whole for
# the reader's pager), and tables get 200 columns instead of rich's default 80.
console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200, soft_wrap=not sys.stderr.isatty())


def _no_bool_metavar() -> None:
    """typer's rich help prints a type for every option, so flags read `--json <bool>` and
    `--help <bool>` as if they took a value. Flags take none: show no type for them."""
    from typer import core
    plain = core.TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else plain(self, ctx)
    core.TyperOption.display_type_rich = display_type_rich


_no_bool_metavar()


class UsageError(ValueError):
    """Bad combination of command-line options."""


# Exception types that mean 'the user can fix this': one line, no traceback. Matched by class
# name along the exception's MRO (classes of autofit and trainer only), so that catching them
# imports nothing (trainer.loop would import torch, ~2 s, even for `autofit config`) and a class
# moving between modules keeps working.
USER_ERRORS = frozenset({
    "UsageError", "ConfigError", "DataError", "TrainError", "DeviceError", "HardwareError", "ProfileError",
    "PlanError", "PlotError", "WeightsError", "CheckpointError", "SampleError",
})


def _is_user_error(e: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS and c.__module__.split(".")[0] in ("autofit", "trainer", "__main__")
               for c in type(e).__mro__)


def load_train_config(config: Optional[Path], preset: Optional[str], overrides: List[str]):
    """The TrainConfig of a command: a preset or a file (the tiny preset when neither is named),
    then --set; with init_from = 'gpt2*' the published model's shape, as nanoGPT's train.py takes
    it. Raises UsageError for --preset with --config: both name a whole model, and a quiet
    winner would train something the user did not pick; ConfigError for a bad config."""
    from trainer.config import load_config
    from trainer.pretrained import gpt2_config
    if preset is not None and config is not None:
        raise UsageError(f"--preset and --config both name a model; pick one (to change a preset's values, "
                         f"use --preset {preset} --set key=value, or copy them into {config})")
    if preset is None and config is None:
        preset = "tiny"  # the built-in default: small enough to train on a laptop CPU in minutes
    return gpt2_config(load_config(preset=preset, config_file=config, overrides=overrides))


ConfigOpt = typer.Option(None, "--config", "-c", help="TOML or nanoGPT-style .py config (parsed, never executed).")
PresetOpt = typer.Option(None, "--preset", help="Built-in preset: tiny, gpt2-124m, rtx4070-seed.")
SetOpt = typer.Option([], "--set", "-s", help="Override a config key: --set key=value (repeatable).")


def _size(value: Optional[str], flag: str) -> Optional[int]:
    if value is None:
        return None
    from autofit.units import parse_size
    try:
        return parse_size(value)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _fmt(n):
    from autofit.units import fmt_bytes
    return fmt_bytes(n) if n else "-"
