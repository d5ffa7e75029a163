"""What `autofit run` says when training ends: finished, interrupted or evaluated, and the command
that continues it. The continuation repeats --max-steps when the run was cut short by it: without
it, `--resume` trains on toward max_iters (--max-steps is a limit of one invocation, not saved in
the checkpoint), which for a nanochat-sized run is days, not the run the user started."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer

from autofit import interrupts
from autofit.cli.common import console, err_console


def continue_command(cfg, max_steps: int | None) -> str:
    """`autofit run --resume --out DIR`, with `--max-steps N` when this invocation had a limit below
    max_iters (the step the user asked to reach is then still ahead), and `--nproc-per-node N`
    when autofit's launcher started this run's N ranks (without it the copied command resumed on
    one rank)."""
    cmd = f"autofit run --resume --out {shlex.quote(str(cfg.out_dir))}"
    if max_steps is not None and max_steps < cfg.max_iters:
        cmd += f" --max-steps {max_steps}"
    return cmd + _ranks_flag()


def _ranks_flag() -> str:
    """' --nproc-per-node N' for a run of N ranks started by `--nproc-per-node` (a torchrun started
    by hand is the user's own command to repeat), else ''."""
    from trainer.interrupt import LAUNCHER_ENV
    world = os.environ.get("WORLD_SIZE", "1").strip()
    return f" --nproc-per-node {world}" if os.environ.get(LAUNCHER_ENV) and world.isdigit() and int(world) > 1 else ""


def report_run(result, cfg, max_steps: int | None = None) -> None:
    """Print how a run ended (trainer.options.RunResult) and what to do next.

    Raises typer.Exit(128 + the stop signal's number) after an interrupt, so the shell (or a
    scheduler) sees which: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (autofit.interrupts.exit_code); or
    typer.Exit(141) when a closed stdout stopped it (autofit.interrupts.PIPE_EXIT_CODE); otherwise
    returns."""
    if result.status == "interrupted":
        from trainer.interrupt import BROKEN_PIPE
        interrupts.said()
        pipe = result.stopped_by == BROKEN_PIPE
        how = "stdout was closed (broken pipe): stopped" if pipe else "interrupted"
        err_console.print(f"{how} after {_steps_done(result)}; "
                          f"checkpoint {result.checkpoint} resumes at step {result.checkpoint_step}; continue with: "
                          f"{continue_command(cfg, max_steps)}" if result.checkpoint else
                          f"{how} during the evaluation at step {result.steps} (eval_only); nothing was saved",
                          markup=False)
        from autofit.devices.ranks import other_rank
        if not other_rank():  # the other ranks' err_console is quiet: only rank 0's line was seen
            interrupts.tell_launcher()
        elif result.stopped_by is None:
            # a stop agreed from another rank (rank 0's closed stdout, or a signal sent to it alone):
            # that rank's code says it. A non-zero code here, first, made torchrun SIGTERM rank 0
            # while it was still writing the checkpoint, which then stopped at once with none
            raise typer.Exit(0)
        raise typer.Exit(interrupts.PIPE_EXIT_CODE if pipe else interrupts.exit_code())
    if result.status == "evaluated":
        ev = result.last_eval or {}
        console.print(f"evaluated (eval_only) at step {result.steps}: train loss {ev.get('train', float('nan')):.4f}, "
                      f"val loss {ev.get('val', float('nan')):.4f} (measured); nothing trained, no checkpoint "
                      f"written; the losses are in {Path(cfg.out_dir) / 'metrics.jsonl'}")
        return
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (None, None)
    msg = f"done: {_steps_done(result)}" + (f", loss {first:.3f} -> {last:.3f}" if first is not None else "")
    console.print(msg + f"; checkpoint {result.checkpoint} (resumes at step {result.checkpoint_step}), metrics "
                  f"{Path(cfg.out_dir) / 'metrics.jsonl'}")
    console.print(_next_line(result, cfg), markup=False)


def _steps_done(result) -> str:
    """'26 optimizer steps', or after a resume this process's share: '23 optimizer steps (steps 3
    to 25; 26 in all)'. result.steps counts from step 0, a resume's earlier steps too; its losses
    are this process's steps only."""
    n = len(result.losses)
    if n == result.steps:
        return f"{n} optimizer step{'s' * (n != 1)}"
    steps = ("" if n == 0 else f"step {result.steps - 1}; " if n == 1 else
             f"steps {result.steps - n} to {result.steps - 1}; ")
    return f"{n} optimizer step{'s' * (n != 1)} ({steps}{result.steps} in all)"


def _next_line(result, cfg) -> str:
    """After a finished run: sample from it, or train on. A run stopped by --max-steps before
    max_iters trains on with a plain --resume (the schedule is max_iters'); one that reached
    max_iters needs a longer schedule (--set max_iters=N), and past lr_decay_iters with min_lr 0
    a longer run alone would train at learning rate 0."""
    from trainer.schedule import at_zero_lr_from
    out = shlex.quote(str(cfg.out_dir))
    ranks = _ranks_flag()
    if result.steps < cfg.max_iters:
        return (f"next: autofit sample --out {out} (text from it), or autofit run --resume --out {out}{ranks} "
                f"(train on to max_iters {cfg.max_iters}; --max-steps N to stop at step N)")
    more = " --set lr_decay_iters=N --allow-changes" if at_zero_lr_from(result.checkpoint_step or 0, cfg) else ""
    return (f"next: autofit sample --out {out} (text from it), or autofit run --resume --out {out}{ranks} "
            f"--set max_iters=N{more} (train on)")
