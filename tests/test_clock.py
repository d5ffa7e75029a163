"""The training clock (trainer/clock.py): a step's time is the device's, not the host's queueing.

A fake GPU keeps a virtual timeline: the host queues a step's kernels in ENQUEUE_S, the device runs
them in KERNEL_S, starting once it has finished what was queued before. Fake CUDA events are stamped
when the device reaches them, as torch.cuda.Event is. No wall clock is read anywhere.
"""
from __future__ import annotations

import json

import pytest
import torch

import trainer.loop
import trainer.redo
from trainer.clock import EventClock, HostClock, step_clock
from trainer.config.train_config import load_config
from trainer.loop import RunOptions, Trainer

ENQUEUE_S = 0.05  # host time to queue one optimizer step's kernels
KERNEL_S = 0.5  # device time to run them: the device falls behind, as a GPU does on a big model


class FakeGpu:
    def __init__(self):
        self.host = 0.0  # the host's clock (seconds)
        self.free_at = 0.0  # when the device has finished everything queued so far
        self.syncs = 0  # host waits for the device

    def queue_step(self):
        start = max(self.free_at, self.host)  # the first kernel runs once the device is free
        self.host += ENQUEUE_S
        self.free_at = start + KERNEL_S


class FakeEvent:
    def __init__(self, gpu: FakeGpu):
        self.gpu, self.stamp = gpu, None

    def record(self):
        self.stamp = max(self.gpu.free_at, self.gpu.host)  # reached after the work queued before it

    def synchronize(self):
        self.gpu.syncs += 1
        self.gpu.host = max(self.gpu.host, self.stamp)

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert end.stamp is not None and self.gpu.host >= end.stamp, "read before the end event was reached"
        return (end.stamp - self.stamp) * 1000.0  # milliseconds, as torch.cuda.Event


def cfg_for(out_dir, steps=6, log_interval=2, **over):
    base = dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=2, gradient_accumulation_steps=1,
                eval_iters=0, eval_interval=0, log_interval=log_interval, dataset="embedded",
                out_dir=str(out_dir), max_iters=steps, warmup_iters=0, lr_decay_iters=steps, dropout=0.0,
                dtype="float32", compile=False, device="cpu")
    base.update(over)
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in base.items()])


@pytest.fixture
def gpu(monkeypatch):
    gpu = FakeGpu()
    real = trainer.redo.train_step

    def queued(*a, **kw):  # the real step on the CPU, then its 'kernels' queued on the fake device
        res = real(*a, **kw)
        gpu.queue_step()
        return res
    monkeypatch.setattr(trainer.redo, "train_step", queued)
    return gpu


def train_records(out_dir):
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == "train"]


def test_step_time_is_the_devices_and_only_logged_steps_sync(tmp_path, gpu):
    cfg = cfg_for(tmp_path)
    Trainer(cfg, RunOptions(device=torch.device("cpu"), progress=False,
                            clock=EventClock(event=lambda: FakeEvent(gpu)))).run()
    recs = train_records(tmp_path)
    assert [r["step"] for r in recs] == [0, 2, 4, 5]
    for r in recs:  # each step took the device KERNEL_S, however early the host was done queueing it
        assert r["step_s"] == pytest.approx(KERNEL_S)
        assert r["tokens_per_s"] == pytest.approx(cfg.tokens_per_step / KERNEL_S)
    assert gpu.syncs == len(recs)  # one wait per logged step; steps 1 and 3 were never waited for


def test_the_host_clock_reads_the_queueing_only(tmp_path, gpu):
    """What the loop reported before: on a device that runs behind, the host clock says 10x too fast."""
    Trainer(cfg_for(tmp_path), RunOptions(device=torch.device("cpu"), progress=False,
                                          clock=HostClock(now=lambda: gpu.host))).run()
    assert [r["step_s"] for r in train_records(tmp_path)] == pytest.approx([ENQUEUE_S] * 4)


def test_compile_time_is_measured_against_device_eager_steps(tmp_path, gpu, monkeypatch):
    """The first compiled step's excess over the eager median (both read as device time)."""
    monkeypatch.setattr(trainer.loop, "compile_model", lambda model, *a: model)  # 'compiles' at once
    compile_s = 3.0
    real = gpu.queue_step

    def slow_first_compiled():  # the compiled step holds the host (compiling) before it queues
        if t.compiled and not t._compile_timed:
            gpu.host += compile_s
        real()
    monkeypatch.setattr(gpu, "queue_step", slow_first_compiled)
    t = Trainer(cfg_for(tmp_path, compile=True, compile_after=3),
                RunOptions(device=torch.device("cpu"), progress=False, clock=EventClock(event=lambda: FakeEvent(gpu))))
    t.run()
    ev = [e for e in t.events if e["event"] == "compile_time"]
    assert len(ev) == 1 and ev[0]["eager_step_s"] == pytest.approx(KERNEL_S)
    # step 2 was logged (the device caught up); the compiled step's device time is compile_s + KERNEL_S
    assert ev[0]["seconds"] == pytest.approx(compile_s, abs=1e-6)


def test_a_cuda_device_gets_event_timing_and_the_cpu_the_host_clock():
    assert isinstance(step_clock(torch.device("cuda", 0)), EventClock)  # no CUDA call is made to choose
    assert isinstance(step_clock(torch.device("cpu")), HostClock)
