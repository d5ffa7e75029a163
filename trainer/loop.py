"""The training loop, in the shape of nanoGPT's train.py: evaluate now and then, step, log,
checkpoint. Two things a launcher needs are built in: torch.compile switched on after a warm-up,
and recovery from an out-of-memory error by redoing the same optimizer step with smaller
micro-batches (trainer.redo; the policy is trainer.recovery's).

The loop takes its plan (micro-batch sizes, when to compile, how to shrink) from RunOptions; it
knows nothing of how the plan was found. Around it: trainer.checkpoint.ckpt, trainer.metrics
(metrics.jsonl, progress), trainer.evaluate, trainer.data.batches, trainer.schedule.

Host syncs: the step's loss, gradient norm and fp16 skip flag stay on the device; the loop reads
them (one sync) only on the steps it logs and before a checkpoint, and stops with a TrainError
naming the first step whose loss was not finite, before anything of it is saved. A step's time
(trainer.clock: CUDA events around it on a GPU) is read on those same logged steps.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from trainer.data.batches import StepBatches
from trainer.checkpoint.ckpt import (atomic_torch_save, best_model_step, clear_cut_writes, read_checkpoint, restore,
                                     training_state)
from trainer.clock import step_clock
from trainer.compiler import DEFAULT_COMPILE_AFTER, compile_model
from trainer.config.train_config import TrainConfig
from trainer.data.datasets import BatchSampler, DataError, load_dataset
from trainer.errors import TrainError
from trainer.evaluate import Evaluator
from trainer.interrupt import EVAL_STOP_NOTICE, KEEP_BEST_STOP_NOTICE, STOP_NOTICE, StopFlag, reported_by_launcher
from trainer.model.losses import SCALER_SKIP_REPORT, read_losses
from trainer.meter import default_meter
from trainer.metrics import MetricsLog, Progress, describe_event, describe_step, open_sinks
from trainer.model.pretrained import build_model
from trainer.distributed.multirank import RankGroup, pick_device, unused_parallelism
from trainer.options import RunOptions, RunResult
from trainer.distributed.ranks import Ranks, signal_at
from trainer.recovery import Recovery, StagedRun, ThrashDetector
from trainer.redo import RedoneStep
from trainer.schedule import lr_at
from trainer.writes import broken_pipe_calls
from trainer.step import FaultInjector, StepResult, check_dtype, make_optimizer, set_matmul_precision

__all__ = ["RunOptions", "RunResult", "TrainError", "Trainer", "train"]


class Trainer(RedoneStep):
    """nanoGPT's training loop for one rank (several under torchrun), with its plan from RunOptions
    and its step redone after an OOM (trainer.redo.RedoneStep). Raises TrainError."""

    def __init__(self, cfg: TrainConfig, opts: RunOptions | None = None):
        self.cfg = cfg
        self.opts = opts = opts or RunOptions()
        ranks = Ranks.from_env()  # torchrun's ranks (one process: rank 0 of 1)
        self.rank, self.world_size, self.master = ranks.rank, ranks.world_size, ranks.master
        self.device = opts.device or pick_device(cfg.device, ranks)
        self.step_batch = StagedRun.fitted_batch(cfg)  # staged: the fitted stage's until the first step
        self.group = RankGroup(ranks, self.device, self.step_batch, cfg.parallelism)
        try:
            self._set_up(cfg, opts)
        except BaseException:  # a library caller under torchrun: the group this joined is left (r4)
            self._close()
            raise

    def _set_up(self, cfg: TrainConfig, opts: RunOptions) -> None:
        """Everything after the ranks are joined: data, model, optimizer, a resumed state."""
        try:
            self.dtype = check_dtype(cfg.dtype, self.device)
        except ValueError as e:
            raise TrainError(str(e)) from None
        self.meter = opts.meter or default_meter(self.device)
        self.clock = opts.clock or step_clock(self.device)  # device time, read on logged steps only
        self.out_dir = Path(cfg.out_dir)
        self.metrics = MetricsLog(self.out_dir, self.master)
        self._open_data()
        self.rank_batch = self.step_batch // self.world_size
        self.recovery = Recovery(self.rank_batch, opts.micro_batch or cfg.batch_size, opts.shrink,
                                 opts.compiled_fit_sizes)
        self.stages = StagedRun.of(cfg, self.world_size, opts.micro_batch or cfg.batch_size)  # None: one stage
        self.thrash = ThrashDetector()
        self.compile_after = (opts.compile_after if opts.compile_after is not None
                              else cfg.compile_after if cfg.compile_after is not None
                              else DEFAULT_COMPILE_AFTER)
        try:
            self.fault = opts.fault or FaultInjector.from_env(self.rank, self.world_size)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise TrainError(f"--out {self.out_dir} is a file, not a directory")
        if self.ckpt_path.exists() and not opts.resume and self.master:
            # a forgotten --resume must not overwrite a run's checkpoint
            raise TrainError(f"{self.ckpt_path} exists: continue it with --resume, or choose another --out")
        self.events: list[dict] = []
        self._progress: Progress | None = None
        self.iter_num, self.best_val_loss = 0, float("inf")
        self.last_eval_iter, self.last_eval = -1, None  # the last evaluation's step and {'train', 'val'} losses
        self.best_saved: int | None = None  # the step whose best val loss ckpt.pt holds (always_save_checkpoint=False)
        self.saved_step: int | None = None  # the step the checkpoint on disk holds
        set_matmul_precision(cfg.tf32)
        with self.meter.tracking():
            self._build_model_and_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "float16" else None
        self.forward = self.model  # compiled after compile_after steps (blocks in place, or a wrapper)
        self.compiled, self.compile_failed = False, False  # compile_failed: compile OOMed, so eager from then on
        self.evaluator = Evaluator(BatchSampler(self.data, cfg.block_size, cfg.seed + 7919), iters=cfg.eval_iters,
                                   batch_size=cfg.batch_size, micro_batch=opts.eval_micro_batch or max(self.micro_batches),
                                   device=self.device, dtype=self.dtype, meter=self.meter, on_event=self._event,
                                   **self.group.eval_hooks())
        self._unread: list[tuple[int, StepResult]] = []  # steps whose loss is still on the device
        self.losses: list[float] = []
        self._eager_laps, self._compile_timed = [], False  # the last eager steps' laps, for the compile time
        self._skips, self._primed = 0, False  # fp16 steps skipped in a row; optimizer state made
        if opts.resume:
            with self.meter.tracking():  # the loaded optimizer state counts against a budget
                self._load_checkpoint()
            self._primed = bool(self.optimizer.state)  # a nanoGPT ckpt.pt may hold no optimizer state

    def _open_data(self) -> None:
        """The dataset, checked against the model before anything runs, and the step batches."""
        cfg = self.cfg
        self.data = load_dataset(cfg.dataset)
        self.data.check_vocab(cfg.vocab_size)
        self.data.check_block_size(cfg.block_size)
        self.group.check_same_data(self.data)
        # the same seed on every rank: each takes its own rows of the same step batch
        self.sampler = BatchSampler(self.data, cfg.block_size, cfg.seed)
        self.batches = StepBatches(self.sampler, pin=self.device.type == "cuda", rows=self.group.rows)

    def _build_model_and_optimizer(self) -> None:
        """A new GPT on the device, or OpenAI's GPT-2 weights (trainer.model.pretrained.build_model),
        wrapped for several ranks (DDP or FSDP2) before its optimizer is made. An OOM here (the
        model alone does not fit: a small budget or card, with --no-probe) is a TrainError, one line."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        with self._oom_as_error(f"making the model on {self.device}, before any step",
                                "a larger budget or device, or a smaller model"):
            self.model, self._pretrained_notes = build_model(cfg, self.device, resume=self.opts.resume)
            self.group.wrap_model(self.model, cfg.seed)
            self.optimizer = make_optimizer(self.model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                            betas=(cfg.beta1, cfg.beta2), device_type=self.device.type,
                                            optimizer=cfg.optimizer, muon_lr=cfg.muon_lr)

    def _close(self) -> None:
        """Closes what the Trainer opened, as far as it got: the batches' reader, metrics.jsonl,
        and the process group, where this Trainer joined it (RankGroup.close)."""
        for part in ("batches", "metrics", "group"):
            if hasattr(self, part):
                getattr(self, part).close()

    micro_batches = property(lambda self: self.recovery.micro_batches)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    # ----------------------------------------------------------------- the loop
    def run(self) -> RunResult:
        """Evaluate now and then, step, log, checkpoint: nanoGPT's loop, until max_iters (or
        --max-steps) or a stop signal (then a checkpoint of the steps done). Raises TrainError."""
        cfg = self.cfg
        stop_at = min(cfg.max_iters, self.opts.max_steps) if self.opts.max_steps is not None else cfg.max_iters
        self.losses: list[float] = []  # every step's loss, read from the device in batches
        progress = self._progress = Progress(enabled=self.opts.progress and self.master, total=stop_at,
                                             start=self.iter_num, master=self.master)
        if self.master:  # before the run record: a sink that cannot open leaves metrics.jsonl as it was
            self.metrics.sinks += open_sinks(cfg, progress.print)
        self._write_run_record()
        try:
            notice = (EVAL_STOP_NOTICE if cfg.eval_only else STOP_NOTICE if cfg.always_save_checkpoint
                      or not (cfg.eval_interval and cfg.eval_iters) else KEEP_BEST_STOP_NOTICE) if self.master else None
            # a closed stdout (`| head`) stops as a signal does, on rank 0 where stdout is written
            with StopFlag(notice, silent=reported_by_launcher()) as stop, broken_pipe_calls(stop.pipe_closed), \
                    progress:
                signal_at("training", self.group.ranks)  # a test's fault: a Ctrl-C as rank 1 lags
                with self.meter.tracking():
                    try:
                        status, tokens = self._steps(stop, stop_at)
                    except DataError as e:  # the data changed under the run (TokenSplit.check_unchanged)
                        raise TrainError(f"{e}; {self._keep_steps_done()}") from None
                # still under the stop flag: a Ctrl-C during this last save is heard, not a KeyboardInterrupt in it
                ckpt = self.save_last() if not cfg.eval_only else None
        finally:
            self._close()
        if status == "interrupted":
            self.metrics.write({"type": "interrupted", "step": self.iter_num, "signal": stop.signal})
        return RunResult(steps=self.iter_num, losses=self.losses, tokens=tokens,
                         micro_batches=list(self.micro_batches), status=status,
                         events=self.events, checkpoint=ckpt, last_eval=self.last_eval,
                         checkpoint_step=self.saved_step if ckpt else None,
                         stopped_by=stop.signal if status == "interrupted" else None)

    def _steps(self, stop: StopFlag, stop_at: int) -> tuple[str, int]:
        """The loop itself, until `stop_at` or a stop: (status, tokens trained on every rank)."""
        cfg, progress, tokens, status = self.cfg, self._progress, 0, "finished"
        self.group.watch(stop)
        self.evaluator.stop, self.evaluator.say = (lambda: self.group.stop_now(stop)), progress.print
        self._say_opening()
        if cfg.eval_only:  # nanoGPT's eval_only: evaluate once, train nothing, save nothing
            self._evaluate_and_save(self.iter_num, save=False)
            stop_at, status = self.iter_num, "interrupted" if self.last_eval is None else "evaluated"
        while True:
            it = self.iter_num
            if self._eval_due(it):
                self._evaluate_and_save(it)
            if it >= stop_at:
                return status, tokens
            if self.group.stop_now(stop):
                return "interrupted", tokens
            if self._compile_due(it):
                self._compile_on(it)
            res, lap = self.train_one_step(it)
            self.iter_num = it + 1
            tokens += res.tokens * self.world_size
            self._unread.append((it, res))
            if it % cfg.log_interval == 0 or self.iter_num == stop_at:
                self._log_step(it, res, self.clock.seconds(lap))  # waits for the device
            self._check_thrash()  # after the log: its record says how this step ran, not the next
            del res  # its device tensors must not outlive the step (a budget counts them)
            progress.advance()

    def _write_run_record(self) -> None:
        """The first record of a run in metrics.jsonl: where, how and with which plan it runs."""
        cfg = self.cfg
        self.metrics.write({"type": "run", "time": time.time(),
                            "resumed_at": self.iter_num if self.opts.resume else None,
                            "device": str(self.device), "dtype": self.dtype, "micro_batches": self.micro_batches,
                            "world_size": self.world_size, "parallelism": self.group.parallelism,
                            "effective_batch": self.step_batch, "block_size": cfg.block_size,
                            "compile": cfg.compile, "compile_after": self.compile_after,
                            "plan": self.opts.plan_info, "config": cfg.model_dump(mode="json")})

    def _say_opening(self) -> None:
        """The run's first lines: device and dtype, the weights' origin, compile, resume notes."""
        if self.cfg.eval_only:  # nanoGPT's eval_only: no step, so no step figures to announce
            self._progress.print(f"evaluating on {self.device} ({self.dtype}), eval_only: no training step; the losses "
                                 f"below are measured on this device")
        else:
            what = "step time, tokens/s and peak memory" if self.meter.capabilities.measures else \
                "step time and tokens/s"  # a plain CPU tracks no peak, and its lines show none (t7's L12)
            self._progress.print(f"training on {self.device} ({self.dtype}{self.cfg.lever_words()}); {what} below are measured on this device")
        if self.master and (cut := clear_cut_writes(self.ckpt_path)):  # the CLI's .autofit.lock: no other writer
            self._progress.print(cut)
        for note in self._pretrained_notes:
            self._progress.print(f"init_from {self.cfg.init_from}: {note}")
        # a resume's config is the checkpoint's (its ranks' parallelism) unless this command set it (--set, a resume config)
        mine = not self.opts.resume or self.cfg.source_of("parallelism") != "default"
        resized = any(e["event"] == "world_size_changed" for e in self.events)
        if note := unused_parallelism(self.cfg.parallelism, self.world_size, mine=mine, resized=resized):
            self._progress.print(note)
        for text in filter(None, map(describe_event, self.events)):  # noted while resuming
            self._progress.print(text)
        self._say_if_compile_cannot_run()  # after: an event prints itself as it is noted

    # ----------------------------------------------------------------- step helpers
    def _timed(self, lap):
        """Keeps the last eager laps; at the first compiled step, its excess over the eager median
        is the compile time, reported apart (a 'compile_time' event; read then, one sync)."""
        if not self.compiled:
            self._eager_laps = (self._eager_laps + [lap])[-5:]
        elif self._eager_laps and not self._compile_timed:
            eager, dt = statistics.median(self.clock.seconds(e) for e in self._eager_laps), self.clock.seconds(lap)
            self._event("compile_time", seconds=round(max(0.0, dt - eager), 3), eager_step_s=round(eager, 4))
            self._compile_timed, self._eager_laps = True, []
        return lap

    def _compile_due(self, it: int) -> bool:
        return (self.cfg.compile and not self.compiled and not self.compile_failed and it >= self.compile_after
                and self.meter.capabilities.compile)

    def _say_if_compile_cannot_run(self) -> None:
        if self.cfg.compile and not self.meter.capabilities.compile:
            self._event("compile_unavailable", reason="torch.compile cannot run under the budgeted CPU device's "
                        "memory tracker (Dynamo traces nothing inside its TorchDispatchMode); training eager")

    def _compile_on(self, it: int) -> None:
        self.forward = compile_model(self.model, self.opts.compile_backend, self.cfg.compile_scope)
        self.group.rewrap(self.forward)  # DDP around the compiled module, on every rank at this step
        self.compiled = True
        self.recovery.compiled_at(it)
        self._event("compile_on", backend=str(self.opts.compile_backend), scope=self.cfg.compile_scope)

    def _read_losses(self) -> None:
        """One host sync for every step not read yet (trainer.model.losses.read_losses): the losses
        are kept, and a non-finite one stops the run before anything of it is saved."""
        if not self._unread:
            return
        unread, self._unread = self._unread, []
        vals, self._skips, report, bad = read_losses(unread, self.scaler is not None, self.group.mean, self._skips)
        self.losses.extend(vals)
        if report:
            self._event("scaler_skips", skipped_steps=SCALER_SKIP_REPORT)
        if bad is not None:
            raise TrainError(f"the loss is not finite at step {bad[0]} ({bad[1]}); stopping, the last good checkpoint "
                             f"{self.ckpt_path} is untouched (lower learning_rate or grad_clip, or use bfloat16)")

    def _log_step(self, it: int, res: StepResult, dt: float) -> None:
        self._read_losses()
        rec = {"type": "train", "step": it, "loss": self.losses[-1], "lr": lr_at(it, self.cfg),  # mean of the ranks
               "tokens_per_s": res.tokens * self.world_size / dt if dt > 0 else None, "step_s": dt,
               "micro_batch": max(res.micro_batches), "grad_accum": len(res.micro_batches),
               # micro-batches are each rank's; the effective batch and tokens/s the whole run's
               "micro_batches": res.micro_batches, "effective_batch": sum(res.micro_batches) * self.world_size,
               "world_size": self.world_size,
               # measured on this device, or None: allocated (tensors) and reserved (the allocator's
               # segments, which is what runs out on CUDA)
               "peak_mem_bytes": self.meter.peak_bytes(), "peak_reserved_bytes": self.meter.peak_reserved_bytes(),
               "compiled": self.compiled, "grad_norm": res.grad_norm,
               # Muon's rate beside AdamW's "lr", as its group holds it (lr x lr_scale: trainer.redo)
               **({"muon_lr": self.optimizer.muon.param_groups[0]["lr"]} if hasattr(self.optimizer, "muon") else {}),
               **(self.stages.record_fields() if self.stages is not None else {})}
        self.metrics.write(rec)
        self._progress.print(describe_step(rec))

    def _event(self, kind: str, **info) -> None:
        ev = {"type": "event", "event": kind, "step": self.iter_num, **info}
        self.events.append(ev)
        self.metrics.write(ev)
        text = describe_event(ev)
        if text and self._progress is not None:
            self._progress.print(text)
        if self.opts.on_event is not None:
            self.opts.on_event(ev)

    # ----------------------------------------------------------------- evaluation
    def _eval_due(self, it: int) -> bool:
        cfg = self.cfg
        return cfg.eval_interval > 0 and cfg.eval_iters > 0 and it % cfg.eval_interval == 0 \
            and it != self.last_eval_iter

    def _evaluate_and_save(self, it: int, save: bool = True) -> None:
        with self._oom_as_error(f"in evaluation at step {it}, at eval micro-batch 1", "give a larger budget"):  # t10's H1
            ev = self.evaluator.evaluate(self.model, f"evaluation at step {it}")  # summed over the ranks: alike on all
        if ev is None:  # a stop asked for during it: the loop checkpoints the steps done and stops
            return
        self.last_eval_iter = it
        self.last_eval = ev
        self.metrics.write({"type": "eval", "step": it, "train_loss": ev["train"], "val_loss": ev["val"]})
        self._progress.print(f"step {it}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}")
        if ev["val"] < self.best_val_loss or self.cfg.always_save_checkpoint:
            best, self.best_val_loss = ev["val"] < self.best_val_loss, min(self.best_val_loss, ev["val"])
            if it > 0 and save:  # ckpt.pt then says whether it holds the best val loss's model (t7's M1)
                self.best_saved = it if best else None
                self.save_checkpoint()

    # ----------------------------------------------------------------- checkpoints
    def save_last(self) -> Path | None:
        """The checkpoint at the end of a run, at a stop, or when an OOM gives up: written, except
        where always_save_checkpoint=False keeps the best val loss's (nanoGPT's rule: ckpt.pt is
        the best model, as its shakespeare_char config asks) and the steps since have no better
        one: then ckpt.pt stays as it is, a 'kept_best' event says so, and saved_step says which."""
        if self.cfg.always_save_checkpoint or self.best_saved is None or self.best_saved == self.iter_num:
            return self.save_checkpoint()
        self._read_losses()  # a non-finite loss still stops the run, saved or not
        self.saved_step = self.best_saved
        self._event("kept_best", best_step=self.best_saved, val_loss=round(self.best_val_loss, 4),
                    steps_not_saved=self.iter_num - self.best_saved)
        return self.ckpt_path

    def _keep_steps_done(self) -> str:
        """Saves the steps done where one process can (the model holds only batches read before
        the data changed: the failed read is the next step's); with several ranks the one that
        failed cannot join a collective save, so the checkpoint on disk is what is left."""
        if self.world_size == 1 and not self.cfg.eval_only and self.iter_num > 0:
            self.save_last()
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"{self.ckpt_path} holds step {self.saved_step}: --resume continues from it"

    def save_checkpoint(self) -> Path | None:
        """Writes <out>/ckpt.pt atomically on rank 0, after checking every step's loss since the
        last check was finite (a TrainError otherwise, and the file on disk stays as it was)."""
        self._read_losses()
        extra = self.group.checkpoint_extra(self.model, self.optimizer, self.micro_batches)  # every rank
        if not self.master:  # every rank knows the step on disk: its own error lines name it (trainer.redo)
            self.saved_step = self.iter_num
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({**training_state(self), **extra}, self.ckpt_path,
                          what=f"checkpoint {self.ckpt_path} (step {self.iter_num})")
        self.saved_step = self.iter_num
        return self.ckpt_path

    def _load_checkpoint(self) -> None:
        """The run's state from ckpt.pt (trainer.checkpoint.ckpt.restore); an OOM while it loads
        (the optimizer's state on a smaller budget or card than it was written on) is one line."""
        with self._oom_as_error(f"loading {self.ckpt_path} on {self.device}", "resume it with a larger budget or device"):
            ck = read_checkpoint(self.ckpt_path, self.device, any_layout=True)
            if self.stages is not None:  # the checkpoint's sampler state is at its stage's block size
                self.stages.resume(self, ck)
            restore(self, ck)
        self.saved_step = self.iter_num
        self.best_saved = best_model_step(ck, self.iter_num, self.best_val_loss)  # None: a save since


def train(cfg: TrainConfig, opts: RunOptions | None = None) -> RunResult:
    return Trainer(cfg, opts).run()
