"""What `autofit run` checks and holds before it trains, apart from the command's arguments
(autofit.cli.app) and how a run ended (autofit.cli.run_end): its output folder held against a second
run (hold_out_dir, released by release_out_dirs), a fresh run's folder and data checked before any
probe (check_fresh_run), a resume's --set values (resume_overrides), --nproc-per-node's checks and
its torchrun (start_ranks), and the options of --no-probe (no_probe_options). Each refusal is one
line (UsageError or the error of the check it calls), before any trial."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import List

import typer

from autofit import interrupts
from autofit.cli.common import UsageError, _size

_OUT_LOCKS: list = []  # (lock, folder, made by this command), held until the command ends


def release_out_dirs() -> None:
    """At the command's end: each output folder's lock released (hold_out_dir), and a folder this
    command made and left holding only its lock file removed (a refused run leaves no folder)."""
    while _OUT_LOCKS:
        lock, folder, made = _OUT_LOCKS.pop()
        with contextlib.suppress(OSError):  # the folder may be gone, or a file now
            if made and os.listdir(folder) == [".autofit.lock"]:
                os.unlink(lock.lock_file)
                os.rmdir(folder)
        lock.release()  # after: a run taking it between would hold a lock file unlinked under it


def hold_out_dir(out_dir: str, tensorboard_dir: str | None = None) -> None:
    """One run at a time in an output folder: a second `autofit run` into it (started at the same
    moment, before either wrote a checkpoint) ends in one line instead of mixing metrics and
    overwriting the other's checkpoint. Rank 0 holds <out>/.autofit.lock (filelock) until the command ends.
    The folders a run writes (--out, tensorboard_dir) are checked first, before any trial."""
    from filelock import FileLock, Timeout

    from trainer.checkpoint.ckpt import check_out_dir
    check_out_dir(out_dir)  # a file on the way, or no write permission: one line, before mkdir
    if tensorboard_dir is not None:
        check_out_dir(tensorboard_dir, "tensorboard_dir")
    if os.environ.get("RANK", "0") != "0":
        return
    made = not Path(out_dir).exists()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(out_dir) / ".autofit.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"another autofit run is using {out_dir} (its .autofit.lock is held); wait for it, "
                         f"or choose another --out") from None
    _OUT_LOCKS.append((lock, out_dir, made))


def resume_overrides(cfg, overrides: List[str], flag: bool) -> tuple[dict, dict]:
    """What a resume is asked to change: the --set values; with init_from='resume' in a config
    (nanoGPT's way), also the values the config file sets (not the preset's or the defaults).
    Returns ({key: value}, {key: where it was set}), the second for error messages."""
    from trainer.config.train_config import parse_override
    out = dict(parse_override(item) for item in overrides)
    sources = dict.fromkeys(out, "--set")
    if not flag:
        for key in type(cfg).model_fields:
            src = cfg.source_of(key)
            if src not in ("default",) and not src.startswith("preset ") and key != "init_from" and key not in out:
                out[key], sources[key] = getattr(cfg, key), src
    asked = out.pop("init_from", "resume")  # 'resume' there says what --resume does: harmless
    if asked != "resume":
        raise UsageError(f"--resume continues the checkpoint's model; --set init_from={asked} starts another: drop one")
    return out, sources


def start_ranks(cfg, nproc_per_node: int, resuming: bool, gpu_index, log, opts, fresh: bool = True,
                 resumed: tuple = ()) -> None:
    """--nproc-per-node N: what a fresh run would refuse is checked here once (`fresh`: a run's output
    folder too; `resumed`: a resume's --set values, their sources, --allow-changes: for its batch), then
    torchrun starts the same command on N ranks; this process exits with their status."""
    from autofit.launch.launcher import relaunch
    from autofit.launch.torchrun import check_ranks
    if gpu_index is not None:
        raise UsageError(f"--gpu-index {gpu_index} picks one GPU; with --nproc-per-node each rank takes the GPU of "
                         f"its LOCAL_RANK: drop --gpu-index (CUDA_VISIBLE_DEVICES picks which GPUs they see)")
    if fresh and not resuming:
        check_fresh_run(cfg, log)
    check_ranks(cfg, nproc_per_node, resuming, *resumed)
    from autofit.devices.cpu import check_ranks_fit
    from autofit.devices.ranks import check_rank_budgets  # each rank's AUTOFIT_RANK_BUDGETS size, counted too
    check_ranks_fit(nproc_per_node, opts.budget_bytes, opts.device, check_rank_budgets(nproc_per_node), opts.device_source)
    code = relaunch(sys.argv[1:], nproc_per_node, log, ckpt=Path(cfg.out_dir) / "ckpt.pt")
    interrupts.said()  # the launcher and rank 0 said what stopped them
    raise typer.Exit(code)


def check_fresh_run(cfg, log) -> None:
    """Before any probe: a forgotten --resume, another run's folder, bad data (not after trials)."""
    from autofit.launch.checks import check_data
    from trainer.checkpoint.ckpt import check_out_dir
    from trainer.metrics import check_fresh_folder
    check_out_dir(cfg.out_dir)
    if (Path(cfg.out_dir) / "ckpt.pt").exists():
        raise UsageError(f"{Path(cfg.out_dir) / 'ckpt.pt'} exists: continue it with "
                         f"autofit run --resume --out {cfg.out_dir}, or choose another --out")
    check_fresh_folder(cfg.out_dir)  # no checkpoint, but another run's metrics.jsonl: not appended to
    from autofit.launch.torchrun import LAUNCHED_ENV
    said_by_launcher = os.environ.get(LAUNCHED_ENV) is not None  # --nproc-per-node checked it once already
    check_data(cfg, log=(lambda s: None) if said_by_launcher else log)
    src = cfg.source_of("vocab_size")
    if (src.endswith("meta.pkl") or src.startswith("dataset")) and not said_by_launcher:
        log(f"vocab_size {cfg.vocab_size}, from {src}")


def no_probe_options(device, budget, gpu_index, source, max_steps, progress):
    """The config as written, on the device asked for (--device, else the config's device: run_cmd), opened
    as every command opens it: --budget gives the budgeted CPU device, a plain CPU measures
    nothing (and compiles for real)."""
    from autofit.devices.opener import open_device
    from trainer.loop import RunOptions
    dev = open_device(device, budget_bytes=_size(budget, "--budget"), gpu_index=gpu_index, cpu="plain", source=source)
    return RunOptions(max_steps=max_steps, progress=progress, meter=dev, device=dev.torch_device)
