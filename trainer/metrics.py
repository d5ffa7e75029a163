"""What a run reports: one JSON object per line in <out>/metrics.jsonl (rank 0 only), and the
progress display on the terminal (a rich bar with ETA, or plain lines when piped).

Records: 'run' (the first: plan, config, device), 'train' (a logged step: loss, lr, tokens/s,
micro-batches, peak allocated and reserved bytes), 'eval', 'event' (OOM recoveries, compile on),
'interrupted'. Every memory figure in them is measured on the run's device, or None.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.errors import TrainError, counted, install_hint
from trainer.writes import append_lines

# The line printed for each event kind; fields come from the event record.
EVENT_TEXT = {
    "oom_shrink": "out of memory{inj}: micro-batch {old_micro_batch} -> {new_micro_batch}, "
                  "effective batch {effective_batch} unchanged; redoing step {step} on the same data",
    "compile_oom_shrink": "out of memory while compiled{inj}: compiled micro-batch {old_micro_batch} -> "
                          "{new_micro_batch}; redoing step {step}",
    "compile_fallback_eager": "out of memory while compiling{inj}: back to eager at micro-batch "
                              "{micro_batch}; redoing step {step}",
    "eval_oom_shrink": "out of memory in evaluation: eval micro-batch now {eval_micro_batch}, training plan "
                       "unchanged; redoing the batch",
    "compile_on": "torch.compile switched on at step {step} ({backend}, {scope})",
    "compile_time": "torch.compile took {seconds:.1f} s (measured: the first compiled step less the eager "
                    "step time), apart from the step times",
    "compile_unavailable": "compile: {reason}",
    "world_size_changed": "resumed on {new_ranks} (the checkpoint's run had {old_world_size}): the "
                          "effective batch {old_effective_batch} -> {effective_batch} sequences; each rank's share "
                          "{old_rank_batch} -> {new_rank_batch}, micro-batches {old_micro_batches} -> {micro_batches}",
    "stage": "stage {stage} from step {step}: {effective_batch} sequences x {block_size} tokens = "
             "{tokens_per_step:,} tokens per step, micro-batches {micro_batches}",
    "kept_best": "ckpt.pt kept as it is, at step {best_step} (the best val loss, {val_loss}): "
                 "always_save_checkpoint=False saves only a better one, as nanoGPT does, so the {steps_since} "
                 "since went unsaved",
    "scaler_skips": "fp16: the GradScaler skipped {skipped_steps} steps in a row (gradients overflow); bfloat16 "
                    "needs no scaler, or lower the learning rate",
}


def describe_event(ev: dict) -> str | None:
    """The human line for an event record, or None for kinds that print nothing."""
    text = EVENT_TEXT.get(ev.get("event", ""))
    if not text:
        return None
    n = ev.get("new_world_size")  # 'on 1 rank', 'on 2 ranks'
    splits = {k: _split_words(ev[k]) for k in ("micro_batches", "old_micro_batches") if isinstance(ev.get(k), list)}
    line = text.format(inj=" (injected)" if ev.get("injected") else "", new_ranks=counted(n, "rank"),
                       steps_since=counted(ev.get("steps_not_saved"), "step"), **{**ev, **splits})
    reason = str(ev.get("reason", ""))
    # another rank's OOM, agreed (a step's or an evaluation batch's): say whose
    if ev["event"].endswith("oom_shrink") and reason.startswith("rank "):
        line += f" ({reason.split(' (')[0]})"
    return line


def _split_words(micro_batches: list) -> str:
    """A split as the plan prints it ('16 = 8 × 2'), not as a Python list (t9's L6); a list that is
    not one (an old or hand-written record) as it is."""
    if micro_batches and all(isinstance(m, int) and m > 0 for m in micro_batches):
        from trainer.step import describe_split  # torch: imported only where a split is described
        return describe_split(micro_batches)
    return str(micro_batches)


def describe_step(rec: dict) -> str:
    """The human line for a 'train' record; memory is the measured allocated peak, in the units
    the probe's plan prints it in (GiB from 1 GiB, else MiB: autofit.units.fmt_bytes)."""
    peak = rec.get("peak_mem_bytes")
    mem = (f", peak {peak / 2**30:.2f} GiB" if peak >= 2**30 else f", peak {peak / 2**20:.1f} MiB") if peak else ""
    dt = rec["step_s"]
    lr = f"lr {rec['lr']:.2e}" + (f" (Muon {rec['muon_lr']:.2e})" if rec.get("muon_lr") is not None else "")
    ranks = rec.get("world_size") or 1
    # several ranks: tokens/s is the whole run's, the micro-batches each rank's, the peak rank 0's
    every, rank0 = (f" ({ranks} ranks)", " per rank") if ranks > 1 else ("", "")
    mem = mem + (" on rank 0" if mem and ranks > 1 else "")
    return (f"step {rec['step']}: loss {rec['loss']:.4f}, {lr}, {dt * 1000:.0f} ms, "
            f"{rec['tokens_per_s'] or 0:,.0f} tok/s{every}, "
            f"{micro_batch_words(rec.get('micro_batches'), rec['micro_batch'], rec['grad_accum'])}{rank0}{mem}")


def micro_batch_words(micro_batches: list[int] | None, largest: int, count: int) -> str:
    """'micro-batch 16 x 2' where every micro-batch is 16; 'micro-batches of 4 and 3, 2 a step'
    for 7 = 4 + 3, where 'micro-batch 4 x 2' would read as 8 sequences. A balanced split's sizes
    differ by at most one (trainer.step.split_batch); a list of several sizes names its extremes."""
    sizes = sorted(set(micro_batches or [largest]), reverse=True)
    if len(sizes) == 1:
        return f"micro-batch {largest} x {count}"
    return f"micro-batches of {sizes[0]} and {sizes[-1]}, {count} a step"


class MetricsLog:
    """Appends records to <out_dir>/metrics.jsonl (whole lines, through trainer.writes), and to
    each attached sink (WandbSink, TensorBoardSink); writes nothing on ranks other than 0. Raises
    WriteError when the disk refuses a record, saying whether the folder's checkpoint is kept."""

    def __init__(self, out_dir: Path, master: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.master = master
        self.sinks: list = []
        # records noted before the run's 'run' record (a resume's world_size_changed, while loading
        # the checkpoint), written after it: each run's records start with its own 'run' record, as
        # the README says (t12's L5: a reader splitting runs there gave the event to the last run)
        self._held: list[dict] | None = []

    def write(self, record: dict) -> None:
        """Appends `record` (a 'run' record first, then those held for it). Raises WriteError."""
        if not self.master:
            return
        if self._held is not None and record.get("type") != "run":
            self._held.append(record)
            return
        self._append(record)
        if record.get("type") == "run":
            held, self._held = self._held or [], None
            for r in held:
                self._append(r)

    def _append(self, record: dict) -> None:
        ckpt = self.path.with_name("ckpt.pt")
        append_lines(self.path, [json.dumps(record)], what=f"metrics {self.path}",
                     kept=f"training stopped; {ckpt} (the last checkpoint written) is kept" if ckpt.exists()
                     else "training stopped; no checkpoint was written")
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        """Writes what is still held (a run that stopped before its 'run' record), ends the sinks."""
        held, self._held = self._held or [], None
        for r in held:
            self._append(r)
        for sink in self.sinks:
            sink.finish()
        self.sinks = []


WANDB_HINT = install_hint("wandb", "wandb")
TENSORBOARD_HINT = install_hint("tensorboard", "tensorboard")


def check_fresh_folder(out_dir: str | Path) -> None:
    """Raises TrainError when a fresh run would append to another run's metrics.jsonl: the folder
    holds one but no checkpoint to resume (that run stopped before its first checkpoint). Records
    of evaluations only (eval_only runs, which train nothing and write no checkpoint: nanoGPT's
    eval_gpt2 configs) are no such run; a run after them appends, its own 'run' record first."""
    path = Path(out_dir) / "metrics.jsonl"
    if path.is_file() and path.stat().st_size > 0 and not (Path(out_dir) / "ckpt.pt").exists() \
            and not _evaluations_only(path):
        raise TrainError(f"{path} holds the records of an earlier run (with no checkpoint to resume); a new run "
                         f"would mix its records into them: move it away, or choose another --out")


def _evaluations_only(path: Path) -> bool:
    """Whether every record in metrics.jsonl belongs to an eval_only run (a 'run' record whose
    config says eval_only, then its records, none a 'train' one). A line that is not such a
    record: False."""
    evaluating = False
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("type") == "run":
                    evaluating = (rec.get("config") or {}).get("eval_only") is True
                if not evaluating or rec.get("type") == "train":
                    return False
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return False
    return evaluating


def _numbers(record: dict) -> dict[str, float]:
    """The numeric fields of a 'train' or 'eval' record, named <type>/<field> (bools and None left out)."""
    return {f"{record['type']}/{k}": v for k, v in record.items()
            if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink:
    """The same records as metrics.jsonl, logged to Weights & Biases (nanoGPT's wandb_log): the
    numbers of 'train' and 'eval' records under train/ and eval/, keyed by optimizer step; each
    event as events/<kind>. WANDB_MODE=offline works with no network (wandb's own setting)."""

    def __init__(self, wandb, project: str, name: str, config: dict):
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, config=config)

    @classmethod
    def open(cls, project: str, name: str, config: dict, say) -> "WandbSink | None":
        """The sink, or None (with one line through `say`) when wandb is not installed."""
        try:
            import wandb
        except ImportError:
            say(f"wandb_log = True, but wandb is not installed ({WANDB_HINT}); logging to metrics.jsonl only")
            return None
        return cls(wandb, project, name, config)

    def log(self, record: dict) -> None:
        kind = record.get("type")
        step = record.get("step")
        if kind in ("train", "eval"):
            self.wandb.log(_numbers(record), step=step)
        elif kind == "event":
            self.wandb.log({f"events/{record.get('event')}": 1}, step=step)

    def finish(self) -> None:
        self.wandb.finish()


class TensorBoardSink:
    """The same records as metrics.jsonl, as TensorBoard scalars in `log_dir` (torch's own
    torch.utils.tensorboard.SummaryWriter, which needs the `tensorboard` package): the numbers of
    'train' and 'eval' records as train/<field> and eval/<field> at their optimizer step, each
    event as events/<kind> = 1. View them with `tensorboard --logdir DIR`."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, log_dir: str, say) -> "TensorBoardSink | None":
        """The sink, or None (with one line through `say`) when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            say(f"tensorboard_dir is set, but tensorboard is not installed ({TENSORBOARD_HINT}); "
                f"logging to metrics.jsonl only")
            return None
        try:
            return cls(SummaryWriter(log_dir=log_dir))
        except OSError as e:
            raise TrainError(f"tensorboard_dir {log_dir}: cannot write there ({e.strerror or e})") from None

    def log(self, record: dict) -> None:
        kind, step = record.get("type"), record.get("step")
        if kind in ("train", "eval"):
            for tag, value in _numbers(record).items():
                self.writer.add_scalar(tag, value, global_step=step)
        elif kind == "event":
            self.writer.add_scalar(f"events/{record.get('event')}", 1, global_step=step)

    def finish(self) -> None:
        self.writer.close()


def open_sinks(cfg, say) -> list:
    """The logging sinks a config asks for (wandb_log, tensorboard_dir), opened on rank 0; one
    line through `say` for each that is not installed, and training goes on without it."""
    sinks = []
    if cfg.wandb_log:
        sinks.append(WandbSink.open(cfg.wandb_project, cfg.wandb_run_name, cfg.model_dump(mode="json"), say))
    if cfg.tensorboard_dir is not None:
        from trainer.checkpoint.ckpt import check_out_dir
        check_out_dir(cfg.tensorboard_dir, "tensorboard_dir")  # a resumed run's, checked nowhere before
        sinks.append(TensorBoardSink.open(cfg.tensorboard_dir, say))
    return [s for s in sinks if s is not None]


class Progress:
    """A rich progress bar with ETA on rank 0; plain prints when disabled or not a terminal."""

    def __init__(self, enabled: bool, total: int, start: int, master: bool = True):
        from rich.console import Console
        # piped or redirected: no bar (its redraws would fill the log) and no wrapping at 80 columns
        self.enabled = enabled and sys.stdout.isatty()
        self.master = master
        self.console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=not sys.stdout.isatty())
        self.bar = None
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def print(self, msg: str) -> None:
        """One line of plain text (no rich markup: '[wandb]' is text, not a style)."""
        if self.bar is not None:
            self.bar.console.print(msg, markup=False, highlight=False)
        elif self.master:
            self.console.print(msg, markup=False, highlight=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)
