"""The `autofit` command. Thin: parse arguments, call the modules, render. Errors a user can
cause end in one line on stderr and exit code 2; nothing already written is lost."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from autofit import interrupts
from autofit.cli.run_start import (check_fresh_run, hold_out_dir, no_probe_options, release_out_dirs,
                                   resume_overrides, start_ranks)
from autofit.cli.common import (BudgetOpt, CkptOpt, CkptPolicyOpt, CompileOpt, ConfigOpt, DeviceOpt, DtypeOpt, GpuIndexOpt, LossOpt,
                                MarginOpt, PresetOpt, SetOpt, UsageError, _probe_options, click_error_line, root, check_init_from_resume, check_no_plan_flags, check_run_flags, user_message,
                                device_from_config,
                                _rerun_args, console, err_console, load_train_config)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="OOM-aware launcher for nanoGPT-style GPT training: measure what fits, plan, train.")
app.callback()(root)  # --version
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
        from trainer.config.stages import batch_words
        t = Table("key", "value", title="resolved TrainConfig")
        for k, v in data.items():
            t.add_row(k, repr(float(f"{v:.12g}")) if isinstance(v, float) else repr(v))  # 0.00012, not ...99999
        console.print(t, batch_words(cfg), sep="\n")  # the table, then the effective batch (or each stage's)
        console.print(f"vocab_size {cfg.vocab_size} from {cfg.source_of('vocab_size')}", soft_wrap=True)


@app.command("probe")
def probe_cmd(config: Optional[Path] = ConfigOpt, preset: Optional[str] = PresetOpt, overrides: List[str] = SetOpt,
              device: Optional[str] = DeviceOpt, budget: Optional[str] = BudgetOpt,
              gpu: Optional[str] = typer.Option(None, "--gpu", help="Simulate a GPU from its hardware profile, built-in or added with `autofit profiles add` (estimates only), e.g. rtx4070-12gb."),
              gpu_index: Optional[int] = GpuIndexOpt, margin: float = MarginOpt, dtype: Optional[str] = DtypeOpt,
              compile: Optional[bool] = CompileOpt, checkpointing: Optional[str] = CkptOpt, loss: Optional[str] = LossOpt,
              checkpointing_policy: Optional[str] = CkptPolicyOpt,
              save: bool = typer.Option(False, "--save", help="Store the fitted plan in this device's profile."),
              plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw peak memory against micro-batch to FILE (.png or .svg; needs matplotlib: pip install matplotlib, or in a checkout pip install -e \".\\[plot]\")."),
              verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the budget, every candidate and why the plan won."),
              as_json: bool = typer.Option(False, "--json", help="Print only JSON."),
              nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="Probe for N ranks of this machine (one GPU each), as run --nproc-per-node N trains: starts torchrun for you.")):
    """Measure what fits on this device (or estimate it for --gpu NAME) and print the plan."""
    from autofit.launch.probe import run_probe
    cfg = load_train_config(config, preset, overrides)
    if nproc_per_node is not None and gpu is not None:
        raise UsageError("--gpu estimates one simulated card; --nproc-per-node measures on this machine's: drop one")
    if gpu is None:  # --gpu simulates a card: no device of this machine is used
        device, gpu_index, src = device_from_config(cfg, device, budget, gpu_index, several=nproc_per_node is not None)
    opts = _probe_options(device, budget, gpu, gpu_index, margin, dtype, compile, checkpointing, loss,
                          checkpointing_policy, src if gpu is None else None)
    # Everything that would fail after the probe is checked before it runs.
    if plot is not None:
        from autofit.report.plot import check_plot_target
        check_plot_target(plot)
    if save and gpu is not None:
        raise UsageError("--save stores measured plans only; --gpu simulates a card and only estimates")
    if save:
        from autofit.profiles.store import check_profiles_writable
        check_profiles_writable()
    log = (lambda s: None) if as_json else (lambda s: err_console.print(f"[dim]{s}[/]"))
    if nproc_per_node is not None:  # a plan for N ranks is probed on N ranks (their smallest budget)
        start_ranks(cfg, nproc_per_node, False, gpu_index, log, opts, fresh=False)
    interrupts.during("interrupted during the probe; nothing was saved"
                      + (" (the plan is saved only after the probe)" if save else ""))
    res, _, _ = run_probe(cfg, opts, log=log, say_schedule=False)  # the stdout block says the schedule
    saved, plot, save_error = _keep_probe(res, cfg, opts, save, plot)
    if as_json:
        out = res.to_json()
        if saved:
            out["saved"] = saved
        if plot is not None:
            out["plot"] = str(plot)
        print(json.dumps(out, indent=2))
    else:
        rerun = _rerun_args(config, preset, overrides, dtype, compile, checkpointing, loss, margin, gpu_index,
                            checkpointing_policy)
        _print_probe(res, cfg, opts, rerun, saved, plot, verbose)
    if save_error is not None:
        raise save_error


def _keep_probe(res, cfg, opts, save: bool, plot):
    """--save and --plot after the probe: (what was saved, the plot or None, an error to raise once
    the plan is shown). A Ctrl-C from here on says what is on disk (`kept`)."""
    kept: list[str] = []
    interrupts.during(lambda: f"interrupted before the plan was shown; {' and '.join(kept) or 'nothing was saved'}")
    saved, save_error = None, None
    if save:
        from autofit.launch.run import ProfileError, save_probe
        try:
            name, fp, path = save_probe(res, cfg, searched_under=opts.search_words())
            saved = {"profile": name, "fingerprint": fp, "path": str(path)}
            kept.append(f"the plan is saved in profile {name} ({path})")
        except ProfileError as e:  # shown after the plan: a failed save must not hide what was measured
            save_error = e
    if plot is not None:  # a plot the disk refuses is said after the plan, as a failed save is
        from autofit.report.plot import PlotError, plot_probe
        try:
            plot_probe(res, cfg, plot)
            kept.append(f"the plot is written to {plot}")
        except PlotError as e:
            save_error, plot = save_error or e, None
    return saved, plot, save_error


def _print_probe(res, cfg, opts, rerun, saved, plot, verbose) -> None:
    from autofit.report.render import render_probe
    # a plan for several ranks is used by a run on as many (its fingerprint holds them)
    rerun = [*rerun, *(["--nproc-per-node", str(res.plan.world_size)] if res.plan.world_size > 1 else [])]
    render_probe(res, console, cfg=cfg, verbose=verbose)
    if plot is not None:
        console.print(f"plot: {plot}")
    # commands are printed as plain text (a '[' in a path or value is not rich markup), each argument
    # shell-quoted so that pasting the line runs exactly this
    if res.mode == "estimated":
        console.print(f"[bold]next[/]: on the {opts.gpu} itself, measure, save and train in one go:")
        console.print("  " + shlex.join(["autofit", "run", "--profile", opts.gpu, *rerun]), markup=False,
                      highlight=False, soft_wrap=True)
    if saved:
        console.print(f"saved to profile [bold]{saved['profile']}[/] ({saved['path']}), plan {saved['fingerprint']}; "
                      f"train with:", soft_wrap=True)
        console.print("  " + shlex.join(["autofit", "run", "--profile", saved["profile"], *rerun]), markup=False,
                      highlight=False, soft_wrap=True)


@app.command("run")
def run_cmd(config: Optional[Path] = ConfigOpt, preset: Optional[str] = PresetOpt,
            overrides: List[str] = SetOpt,
            max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Train optimizer steps 0 to N-1, then stop with a checkpoint (the LR schedule still follows max_iters)."),
            out: Optional[str] = typer.Option(None, "--out", help="Output directory (checkpoints, metrics.jsonl; default: the config's out_dir)."),
            resume: bool = typer.Option(False, "--resume", help="Continue from <out>/ckpt.pt."),
            profile: Optional[str] = typer.Option(None, "--profile", help="Use (or fit and save) the plan in this GPU profile, e.g. rtx4070-12gb."),
            emulate: bool = typer.Option(False, "--emulate", help="On a larger GPU, cap this process to the profile's memory."),
            no_probe: bool = typer.Option(False, "--no-probe", help="Train the config as written: no probe, no plan."),
            device: Optional[str] = DeviceOpt, budget: Optional[str] = BudgetOpt, gpu_index: Optional[int] = GpuIndexOpt,
            margin: float = MarginOpt, dtype: Optional[str] = DtypeOpt, compile: Optional[bool] = CompileOpt,
            checkpointing: Optional[str] = CkptOpt, loss: Optional[str] = LossOpt, checkpointing_policy: Optional[str] = CkptPolicyOpt,
            no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."), allow_changes: bool = typer.Option(False, "--allow-changes", help="With --resume: accept --set values that change what the run trains (said in the log)."),
            nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="Train on N ranks of this machine (one GPU each): starts torchrun for you."),
            ):
    """Train with a fitted plan; with no arguments, the tiny preset on this machine, probed first."""
    check_run_flags(out, max_steps, emulate, profile, budget, resume, config, preset, allow_changes, overrides, nproc_per_node)
    # --resume: the --set values apply to the checkpoint's config (prepare_resume), not the tiny preset
    cfg = load_train_config(config, preset, [o for o in overrides if o.startswith("out_dir=")] if resume else overrides)
    cfg.out_dir = out if out is not None else cfg.out_dir
    check_init_from_resume(cfg, resume, preset, profile)
    log = lambda s: err_console.print(f"[dim]{s}[/]")
    device, gpu_index, src = device_from_config(cfg, device, budget, gpu_index, several=nproc_per_node is not None)
    opts = _probe_options(device, budget, None, gpu_index, margin, dtype, compile, checkpointing, loss,
                          checkpointing_policy, src)
    check_no_plan_flags(opts, profile, "--no-probe" if no_probe else "eval_only" if cfg.eval_only else None, cfg)
    if profile is not None:  # its card is here, and a probe may save into it: before data or trials
        from autofit.launch.profile_gpu import check_profile_here
        check_profile_here(profile, emulate, opts, _rerun_args(config, preset, overrides, dtype, compile, checkpointing, loss, margin))
    resuming = resume or cfg.init_from == "resume"
    asked, sources = resume_overrides(cfg, overrides, resume) if resuming else ({}, {})
    if not resuming:  # before the output folder is made: a run with no step to train writes nothing
        from autofit.launch.checks import check_steps_left
        check_steps_left(0, cfg, max_steps)
    if nproc_per_node is not None:  # the same command on N ranks, through torchrun; checked here once first
        start_ranks(cfg, nproc_per_node, resuming, gpu_index, log, opts, resumed=(asked, sources, allow_changes))
    hold_out_dir(cfg.out_dir, cfg.tensorboard_dir)
    if resuming:  # nanoGPT's init_from='resume' is --resume
        from autofit.launch.resume import prepare_resume
        from trainer.checkpoint.ckpt import check_out_dir
        check_out_dir(cfg.out_dir)
        interrupts.during(f"interrupted before training resumed; {Path(cfg.out_dir) / 'ckpt.pt'} is kept as it was")
        launch = prepare_resume(cfg.out_dir, asked, probe_opts=opts, sources=sources, allow_changes=allow_changes,
                                max_steps=max_steps, progress=not no_progress, log=log)
        _say_plan(launch, detail=launch.probe is not None)
        _train(launch.cfg, launch.opts)
        return
    check_fresh_run(cfg, log)
    from autofit.launch.run import prepare_run, say_schedule
    say_schedule(cfg, max_steps, console.print, log)  # said, not refused (nanoGPT runs it too), before the probe
    from autofit.launch.torchrun import check_ranks
    check_ranks(cfg, None, False)  # under torchrun: the effective batch divides, before any probe
    if no_probe or cfg.eval_only:  # eval_only trains nothing: no plan to fit
        _train(cfg, no_probe_options(device, budget, gpu_index, src, max_steps, not no_progress))
        return
    interrupts.during("interrupted before training started (during the probe); no checkpoint was written")
    launch = prepare_run(cfg, profile=profile, emulate=emulate, probe_opts=opts, max_steps=max_steps,
                         resume=False, progress=not no_progress, log=log)
    _say_plan(launch)
    _train(launch.cfg, launch.opts)


def _say_plan(launch, detail: bool = True) -> None:
    """Where the plan came from, and (`detail`) the plan in one line (autofit.report.render.plan_line):
    a plan probed now, also a nanoGPT checkpoint's; an autofit resume goes on with its own (no line)."""
    from autofit.report.render import plan_line
    console.print(f"[bold]plan[/]: {launch.source}")
    if detail:
        console.print(plan_line(launch.plan, launch.trials))  # a saved plan's trials too


def _train(cfg, opts) -> None:
    """The training run, and its report. The loop takes the first Ctrl-C itself (checkpoint, stop);
    a second one stops at once, and the last checkpoint written is what is kept (said too when the
    disk refuses stdout or a file mid-run)."""
    from autofit.cli.run_end import report_run
    from trainer.loop import train
    from trainer.writes import WriteError
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    kept = lambda: f"{ckpt} (the last checkpoint written) is kept" if ckpt.exists() else "no checkpoint was written"
    interrupts.during(lambda: f"interrupted during training, stopped at once; {kept()}{interrupts.why_at_once()}")
    try:
        result = train(cfg, opts)
    except WriteError as e:
        raise e.with_kept(f"training stopped; {kept()}") from None
    report_run(result, cfg, opts.max_steps)


def _run_app():
    try:
        return app(standalone_mode=False)
    finally:
        release_out_dirs()


from autofit.cli.data import data_app, sample_app  # noqa: E402  (data prepare, sample)
from autofit.cli.profiles import profiles_app  # noqa: E402  (the `profiles` sub-commands)

app.add_typer(profiles_app, name="profiles")
app.add_typer(data_app, name="data")
app.registered_commands += sample_app.registered_commands


def say_interrupted() -> None:
    """One line for a Ctrl-C (autofit.interrupts), from rank 0 only under torchrun; once."""
    from autofit.devices.ranks import other_rank  # no torch: the Ctrl-C may have fallen into its import
    text = interrupts.line()
    interrupts.said()
    if text and not other_rank():
        print(f"autofit: {text}", file=sys.stderr)
        interrupts.tell_launcher()


def main() -> None:
    interrupts.reset()
    try:
        # numpy before anything imports torch: torch's C start-up imports numpy and discards any
        # exception raised in it (numpy is optional there), so a Ctrl-C or SIGTERM that fell into
        # that import was lost (the run trained on, or broke later on a half-built numpy); here it
        # is an ordinary KeyboardInterrupt, said below in one line. Not for --help and profiles,
        # which load no torch: numpy was a third of their start-up
        args = sys.argv[1:]
        if args and args[0] != "profiles" and not {"--help", "-h"} & set(args):
            import numpy  # noqa: F401
        from autofit.launch.torchrun import error_prefix, quiet_unless_rank0, report_error, session
        from trainer.writes import guarded_stdout
        # stdout closed: refused; full: one line (trainer.writes). torchrun: one process group, left at the end
        with guarded_stdout(), session():
            quiet_unless_rank0(console, err_console)
            code = _run_app()
        if code == interrupts.EXIT_CODE:  # typer turns a Ctrl-C inside a command into exit code 130, silently
            say_interrupted()
            code = interrupts.exit_code()  # 128 + the stop signal's number: a SIGTERM's 143, a SIGHUP's 129
    except KeyboardInterrupt:
        say_interrupted()
        sys.exit(interrupts.exit_code())
    except Exception as e:
        from autofit.launch.torchrun import taken_as_stop
        if taken_as_stop(e):  # a rank that lost contact after its own Ctrl-C: interrupted, not an error
            say_interrupted()
            sys.exit(interrupts.exit_code())
        msg = user_message(e)
        if msg is not None:
            if not report_error(msg):  # under torchrun it may go to the launcher, to be said once
                print(f"autofit: error: {error_prefix(msg)}{msg}", file=sys.stderr)
            sys.exit(2)
        # click's (or typer's vendored click's) usage errors carry exit code 2 and a message:
        # one line too, instead of a boxed multi-line panel
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `autofit`: the help was shown
            sys.exit(0)
        if getattr(e, "exit_code", None) == 2 and hasattr(e, "format_message"):
            print(f"autofit: error: {click_error_line(e, sys.argv[1:])}", file=sys.stderr)
            sys.exit(2)
        if type(e).__name__ == "Abort":  # Ctrl-C at a prompt
            say_interrupted()
            sys.exit(interrupts.exit_code())
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # python -m autofit.cli.app
    main()
