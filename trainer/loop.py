"""The training loop: nanoGPT's schedule, evaluation, metrics, checkpoints and resume, plus the
two things a launcher needs from it: torch.compile switched on after a warm-up, and recovery from
an out-of-memory error by redoing the same optimizer step with smaller micro-batches.

The loop takes its plan (micro-batch sizes, when to compile, how to shrink) from RunOptions; it
knows nothing of how the plan was found.
"""
from __future__ import annotations

import gc
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.config import TrainConfig
from trainer.data import BatchSampler, load_dataset
from trainer.meter import MemoryMeter, default_meter, is_oom
from trainer.model import GPT, GPTConfig, clean_state_dict
from trainer.step import FaultInjector, InjectedOOM, make_optimizer, split_batch, train_step

DEFAULT_COMPILE_AFTER = 20  # eager steps before torch.compile, when neither config nor plan says
THRASH_STEPS = 3  # consecutive steps with rising allocator retries that count as an OOM
# OOMs in the first steps after torch.compile switches on (or after a compiled shrink) are blamed
# on compilation: tracing and autotuning raise the peak above the steady state.
COMPILE_WINDOW = 3


class TrainError(RuntimeError):
    """A failure the user can act on (one line, no traceback)."""


@dataclass
class RunOptions:
    micro_batch: int | None = None  # None: the config's batch_size, as nanoGPT
    compile_after: int | None = None
    compile_backend: str = "inductor"
    compiled_fit_sizes: list[int] = field(default_factory=list)  # compiled micro-batches known to fit
    # shrink(micro_batch_that_failed) -> the next micro-batch to try, or None to give up.
    shrink: Callable[[int], int | None] | None = None
    on_event: Callable[[dict], None] | None = None  # OOM recoveries etc., for the launcher's profile
    plan_info: dict[str, Any] | None = None  # recorded in the metrics file: which plan, from where
    eval_micro_batch: int | None = None
    max_steps: int | None = None  # stop after this optimizer step; the LR schedule is unchanged
    resume: bool = False
    meter: MemoryMeter | None = None
    device: torch.device | None = None
    progress: bool = True
    fault: FaultInjector | None = None  # default: from AUTOFIT_FAULT_OOM_AT_STEP


@dataclass
class RunResult:
    steps: int
    losses: list[float]
    tokens: int
    micro_batches: list[int]
    status: str  # 'finished' | 'interrupted'
    events: list[dict]
    checkpoint: Path | None


def lr_at(it: int, cfg: TrainConfig) -> float:
    """nanoGPT: linear warm-up, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {cfg.device!r} asked for, but torch sees no CUDA GPU")
    return dev


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> str:
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return cfg.resolved_dtype(device.type, bf16)


CHECKPOINT_KEYS = ("model", "optimizer", "iter_num", "config", "sampler", "eval_sampler", "rng_cpu")


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Loads with weights_only=True (no code in a checkpoint runs) and checks it is ours."""
    if not path.exists():
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # corrupt, truncated, or a pickle that wants to run code
        raise TrainError(f"{path} is not a valid autofit checkpoint (unreadable with weights_only=True)") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise TrainError(f"{path} is not an autofit checkpoint (missing {', '.join(missing)})")
    return ck


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Temp file, fsync, rename: a crash mid-write never leaves a half checkpoint at `path`."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop finishes the step, saves a checkpoint and returns."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: TrainConfig, opts: RunOptions | None = None):
        self.cfg = cfg
        self.opts = opts = opts or RunOptions()
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0
        self.device = opts.device or pick_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        self.meter = opts.meter or default_meter(self.device)
        self.out_dir = Path(cfg.out_dir)
        self.data = load_dataset(cfg.dataset)
        self.data.check_vocab(cfg.vocab_size)
        self.sampler = BatchSampler(self.data, cfg.block_size, cfg.seed + self.rank)
        # evaluation draws from its own sampler, so how often we evaluate never changes the
        # training batches
        self.eval_sampler = BatchSampler(self.data, cfg.block_size, cfg.seed + 7919)
        if cfg.effective_batch % self.world_size:
            raise TrainError(f"effective batch {cfg.effective_batch} does not split over {self.world_size} ranks")
        self.rank_batch = cfg.effective_batch // self.world_size
        mb = opts.micro_batch or cfg.batch_size
        self.micro_batches = split_batch(self.rank_batch, mb)
        self.compile_after = (opts.compile_after if opts.compile_after is not None
                              else cfg.compile_after if cfg.compile_after is not None
                              else DEFAULT_COMPILE_AFTER)
        try:
            self.fault = opts.fault or FaultInjector.from_env()
        except ValueError as e:
            raise TrainError(str(e)) from None
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise TrainError(f"--out {self.out_dir} is a file, not a directory")
        if self.ckpt_path.exists() and not opts.resume and self.master:
            # a forgotten --resume must not overwrite a run's checkpoint
            raise TrainError(f"{self.ckpt_path} exists: continue it with --resume, or choose another --out")
        self.events: list[dict] = []
        self._progress: _Progress | None = None
        self.iter_num = 0
        self.best_val_loss = float("inf")
        self.last_eval_iter = -1
        with self.meter.tracking():
            torch.manual_seed(cfg.seed)
            self.model = GPT(GPTConfig.from_train_config(cfg)).to(self.device)
            self.optimizer = make_optimizer(self.model, learning_rate=cfg.learning_rate,
                                            weight_decay=cfg.weight_decay,
                                            betas=(cfg.beta1, cfg.beta2), device_type=self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "float16" else None
        self.forward = self.model  # becomes the compiled module after compile_after steps
        self.compiled = False
        self.compile_failed = False  # compile OOMed and we fell back to eager: stay eager
        self.compile_window_end = -1
        self.eval_micro_batch = opts.eval_micro_batch or max(self.micro_batches)
        if opts.resume:
            with self.meter.tracking():  # the loaded optimizer state counts against a budget
                self._load_checkpoint()

    # ----------------------------------------------------------------- bookkeeping
    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    def _log(self, record: dict) -> None:
        if not self.master:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _event(self, kind: str, **info) -> None:
        ev = {"type": "event", "event": kind, "step": self.iter_num, **info}
        self.events.append(ev)
        self._log(ev)
        text = {
            "oom_shrink": "out of memory{inj}: micro-batch {old_micro_batch} -> {new_micro_batch}, "
                          "effective batch {effective_batch} unchanged; redoing step {step} on the same data",
            "compile_oom_shrink": "out of memory while compiled{inj}: compiled micro-batch {old_micro_batch} -> "
                                  "{new_micro_batch}; redoing step {step}",
            "compile_fallback_eager": "out of memory while compiling{inj}: back to eager at micro-batch "
                                      "{micro_batch}; redoing step {step}",
            "eval_oom_shrink": "out of memory in evaluation: eval micro-batch now {eval_micro_batch} "
                               "(training plan unchanged)",
            "compile_on": "torch.compile switched on at step {step} ({backend})",
        }.get(kind)
        if text and self._progress is not None:
            self._progress.print(text.format(inj=" (injected)" if info.get("injected") else "", **ev))
        if self.opts.on_event is not None:
            self.opts.on_event(ev)

    def save_checkpoint(self) -> Path | None:
        if not self.master:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "last_eval_iter": self.last_eval_iter,
            "config": self.cfg.model_dump(mode="json"),
            "sampler": self.sampler.state_dict(),
            "eval_sampler": self.eval_sampler.state_dict(),
            "compile_failed": self.compile_failed,
            "micro_batches": list(self.micro_batches),
            # what `autofit run --resume` needs to continue the same plan on the same device
            "plan": json.dumps(self.opts.plan_info) if self.opts.plan_info else None,
            "device_kind": self.device.type,
            "cpu_budget_bytes": getattr(self.meter, "budget_bytes", None),
            "cuda_memory_cap_bytes": getattr(self.meter, "memory_cap_bytes", None),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        atomic_torch_save(state, self.ckpt_path)
        return self.ckpt_path

    def _load_checkpoint(self) -> None:
        if not self.ckpt_path.exists():
            raise TrainError(f"--resume: no checkpoint at {self.ckpt_path}")
        ck = read_checkpoint(self.ckpt_path, self.device)
        saved = TrainConfig(**ck["config"])
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise TrainError(f"checkpoint {self.ckpt_path} has {key}={getattr(saved, key)}, "
                                 f"config has {getattr(self.cfg, key)}")
        self.model.load_state_dict(clean_state_dict(ck["model"]))
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.iter_num = int(ck["iter_num"])
        self.best_val_loss = float(ck["best_val_loss"])
        self.last_eval_iter = int(ck.get("last_eval_iter", -1))
        self.sampler.load_state_dict(ck["sampler"])
        self.eval_sampler.load_state_dict(ck["eval_sampler"])
        self.compile_failed = bool(ck.get("compile_failed", False))
        torch.set_rng_state(ck["rng_cpu"].cpu())
        if ck.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng_cuda"].cpu(), self.device)
        del ck

    def _rng_state(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    # ----------------------------------------------------------------- memory recovery
    def _cleanup_after_oom(self) -> None:
        """Runs after the except block has ended, so its traceback no longer pins the failed
        step's activations."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # a fresh scaler: the failed step may have left inf checks behind
            self.scaler = torch.amp.GradScaler(self.device.type, init_scale=self.scaler.get_scale())
        gc.collect()
        self.meter.cleanup()

    def _next_micro_batch(self, failed: int) -> int | None:
        if self.opts.shrink is not None:
            return self.opts.shrink(failed)
        return failed // 2 if failed > 1 else None

    def _shrink(self, reason: str, injected: bool = False) -> None:
        """Smaller micro-batches after an OOM (or allocator thrashing); the caller redoes the step.
        In the first compiled steps the OOM is blamed on compilation: a smaller size that a
        compiled trial showed to fit, else eager at the same size (eager trials showed it fits)."""
        failed = max(self.micro_batches)
        extra = {"injected": True} if injected else {}
        if self.compiled and self.iter_num < self.compile_window_end:
            smaller = [s for s in self.opts.compiled_fit_sizes if s < failed]
            if smaller:
                new = max(smaller)
                self.micro_batches = split_batch(self.rank_batch, new)
                self._event("compile_oom_shrink", reason=reason, old_micro_batch=failed, new_micro_batch=new,
                            micro_batches=self.micro_batches, effective_batch=sum(self.micro_batches), **extra)
                return
            self.forward, self.compiled, self.compile_failed = self.model, False, True
            self._event("compile_fallback_eager", reason=reason, micro_batch=failed, **extra)
            return
        new = self._next_micro_batch(failed)
        if not new or new >= failed:
            raise TrainError(f"out of memory at step {self.iter_num} with micro-batch {failed}, "
                             f"and no smaller micro-batch is left to try ({reason})")
        self.micro_batches = split_batch(self.rank_batch, new)
        if self.compiled:  # the new shapes compile now: the compile fallbacks apply again
            self.compile_window_end = self.iter_num + COMPILE_WINDOW
        self._event("oom_shrink", reason=reason, old_micro_batch=failed, new_micro_batch=new,
                    micro_batches=self.micro_batches, effective_batch=sum(self.micro_batches), **extra)

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of batch_size sequences per split. The batches are
        fixed by the sampler; eval_micro_batch only decides how they are chunked, and an OOM
        halves it (the training plan is not touched)."""
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            total = 0.0
            for _ in range(self.cfg.eval_iters):
                x, y = self.eval_sampler.sample(split, self.cfg.batch_size)
                while True:
                    try:
                        total += self._eval_batch(x, y)
                        break
                    except Exception as e:
                        if not is_oom(e) or self.eval_micro_batch <= 1:
                            raise
                    gc.collect()
                    self.meter.cleanup()
                    self.eval_micro_batch //= 2
                    self._event("eval_oom_shrink", eval_micro_batch=self.eval_micro_batch)
            out[split] = total / self.cfg.eval_iters
        self.model.train()
        return out

    def _eval_batch(self, x: torch.Tensor, y: torch.Tensor) -> float:
        from trainer.step import autocast
        loss = 0.0
        for s in range(0, x.shape[0], self.eval_micro_batch):
            xb, yb = x[s:s + self.eval_micro_batch].to(self.device), y[s:s + self.eval_micro_batch].to(self.device)
            with autocast(self.device.type, self.dtype):
                loss += float(self.model(xb, yb)) * xb.shape[0]
        return loss / x.shape[0]

    # ----------------------------------------------------------------- the loop
    def run(self) -> RunResult:
        cfg, opts = self.cfg, self.opts
        stop_at = min(cfg.max_iters, opts.max_steps) if opts.max_steps is not None else cfg.max_iters
        self._log({"type": "run", "time": time.time(), "resumed_at": self.iter_num if opts.resume else None,
                   "device": str(self.device), "dtype": self.dtype, "micro_batches": self.micro_batches,
                   "effective_batch": cfg.effective_batch, "block_size": cfg.block_size,
                   "compile": cfg.compile, "compile_after": self.compile_after,
                   "plan": opts.plan_info, "config": cfg.model_dump(mode="json")})
        losses: list[float] = []
        tokens = 0
        status = "finished"
        prev_retries, rising = None, 0
        progress = self._progress = _Progress(enabled=opts.progress and self.master, total=stop_at,
                                              start=self.iter_num, master=self.master)
        with self.meter.tracking(), _StopFlag() as stop, progress:
            progress.print(f"training on {self.device} ({self.dtype}); step time, tokens/s and peak memory "
                           f"below are measured on this device")
            while True:
                it = self.iter_num
                if cfg.eval_interval > 0 and it % cfg.eval_interval == 0 and it != self.last_eval_iter \
                        and cfg.eval_iters > 0:
                    ev = self.evaluate()
                    self.last_eval_iter = it
                    self._log({"type": "eval", "step": it, "train_loss": ev["train"], "val_loss": ev["val"]})
                    progress.print(f"step {it}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}")
                    if ev["val"] < self.best_val_loss or cfg.always_save_checkpoint:
                        self.best_val_loss = min(self.best_val_loss, ev["val"])
                        if it > 0:
                            self.save_checkpoint()
                if it >= stop_at:
                    break
                if stop.signal is not None:
                    status = "interrupted"
                    break
                if cfg.compile and not self.compiled and not self.compile_failed and it >= self.compile_after:
                    # static shapes: the full and the short last micro-batch each get a graph,
                    # with no dynamic-shape retrace, as the trials compiled them
                    torch._dynamo.reset()
                    self.forward = torch.compile(self.model, backend=opts.compile_backend, dynamic=False)
                    self.compiled = True
                    self.compile_window_end = it + COMPILE_WINDOW
                    self._event("compile_on", backend=opts.compile_backend)
                lr = lr_at(it, cfg)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                x, y = self.sampler.sample("train", self.rank_batch)  # the whole step's batch, once
                rng = self._rng_state()  # a redone step draws the same dropout masks
                t0 = time.perf_counter()
                while True:
                    self.meter.reset_peak()
                    failure, injected = None, False
                    try:
                        res = train_step(self.model, self.optimizer, x, y, self.micro_batches,
                                         dtype=self.dtype, scaler=self.scaler, grad_clip=cfg.grad_clip,
                                         forward=self.forward, step=it, fault=self.fault)
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        failure = str(e).splitlines()[0][:200]
                        injected = isinstance(e, InjectedOOM)
                    if failure is None:
                        break
                    self._cleanup_after_oom()
                    try:
                        self._shrink(failure, injected)
                    except TrainError:
                        self.save_checkpoint()  # keep the steps that did complete
                        raise
                    self._set_rng_state(rng)
                    t0 = time.perf_counter()
                dt = time.perf_counter() - t0
                self.iter_num = it + 1
                losses.append(res.loss)
                tokens += res.tokens
                peak = self.meter.peak_bytes()
                retries = getattr(self.meter, "alloc_retries", None)
                if retries is not None:  # allocator thrashing: shrink before it becomes an OOM
                    r = retries()
                    rising = rising + 1 if prev_retries is not None and r > prev_retries else 0
                    prev_retries = r
                    if rising >= THRASH_STEPS and max(self.micro_batches) > 1:
                        self._shrink(f"allocator retries rose for {rising} steps")
                        rising = 0
                if it % cfg.log_interval == 0 or self.iter_num == stop_at:
                    rec = {"type": "train", "step": it, "loss": res.loss, "lr": lr,
                           "tokens_per_s": res.tokens / dt if dt > 0 else None, "step_s": dt,
                           "micro_batch": max(res.micro_batches), "grad_accum": len(res.micro_batches),
                           "micro_batches": res.micro_batches, "effective_batch": sum(res.micro_batches),
                           "peak_mem_bytes": peak, "compiled": self.compiled, "grad_norm": res.grad_norm}
                    self._log(rec)
                    mem = f", peak {peak / 2**20:,.1f} MiB" if peak else ""
                    progress.print(f"step {it}: loss {res.loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
                                   f"{res.tokens / dt:,.0f} tok/s, micro-batch {max(res.micro_batches)}"
                                   f" x {len(res.micro_batches)}{mem}")
                progress.advance()
        ckpt = self.save_checkpoint()
        if status == "interrupted":
            self._log({"type": "interrupted", "step": self.iter_num, "signal": stop.signal})
        return RunResult(steps=self.iter_num, losses=losses, tokens=tokens,
                         micro_batches=list(self.micro_batches), status=status, events=self.events,
                         checkpoint=ckpt)


class _Progress:
    """A rich progress bar with ETA on rank 0; plain prints when disabled or not a terminal."""

    def __init__(self, enabled: bool, total: int, start: int, master: bool = True):
        from rich.console import Console
        self.enabled = enabled
        self.master = master
        import sys
        self.console = Console(width=None if sys.stdout.isatty() else 120)  # piped logs: no wrapping at 80
        self.bar = None
        if enabled:
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
        if self.bar is not None:
            self.bar.console.print(msg)
        elif self.master:
            self.console.print(msg)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)


def train(cfg: TrainConfig, opts: RunOptions | None = None) -> RunResult:
    return Trainer(cfg, opts).run()
