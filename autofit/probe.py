"""`autofit probe`: pick the device (a real GPU, the budgeted CPU, or a simulated GPU), work out
the budget, and run the planner in the matching mode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from autofit.budget import compute_budget
from autofit.devices import CudaDevice, DeviceError, detect_gpu, measure_cuda_context_bytes, simulated_info
from autofit.planner import ProbeResult, candidate_space, device_info, probe_estimated, probe_measured
from autofit.trials import TrialSettings, set_allocator_conf


@dataclass
class ProbeOptions:
    device: str | None = None  # 'cuda' | 'cpu' | None (a GPU if there is one, else the CPU)
    budget_bytes: int | None = None  # CPU only
    gpu: str | None = None  # simulate this hardware profile: estimates only
    gpu_index: int = 0
    margin: float = 0.10
    dtype: str | None = None
    compile: bool | None = None
    checkpointing: list[int] | None = None
    loss_impls: list[str] | None = None
    emulate_bytes: int | None = None  # on a bigger GPU: cap the process to this many bytes
    trial_steps: int = 2
    compile_backend: str = "inductor"


def open_device(opts: ProbeOptions):
    """The measuring device: CudaDevice or BudgetedCpuDevice."""
    from autofit.cpu_budget import BudgetedCpuDevice
    want = opts.device
    if want not in (None, "cpu", "cuda"):
        raise DeviceError(f"--device must be 'cuda' or 'cpu', got {want!r}")
    if want == "cpu" or (want is None and opts.budget_bytes is not None):
        return BudgetedCpuDevice(budget_bytes=opts.budget_bytes)
    if opts.budget_bytes is not None:
        raise DeviceError("--budget applies to the CPU device only; on a GPU the budget is free memory x (1 - margin)")
    set_allocator_conf()  # before anything can initialise CUDA (detect_gpu's fallback does)
    try:
        info = detect_gpu(opts.gpu_index)  # NVML first: no CUDA context yet
    except DeviceError:
        if want == "cuda":
            raise
        return BudgetedCpuDevice(budget_bytes=None)
    if not torch.cuda.is_available():
        raise DeviceError(f"NVML sees {info.name}, but this torch build has no CUDA support "
                          f"(torch {torch.__version__}); install a CUDA build of torch")
    return CudaDevice(opts.gpu_index, info)


EMULATE_NOTE = ("emulated: this process is capped (set_per_process_memory_fraction) to the profile's "
                "capacity less the CUDA context; the context and library workspaces differ between cards, "
                "so this approximates the smaller card")


def prepare_cuda(device, info, margin: float, emulate_cap: int | None = None):
    """Measures the CUDA context, applies an emulation cap, and returns (info, budget)."""
    from autofit.budget import ASSUMED_CONTEXT_BYTES
    # NVML's free memory was read before our CUDA context existed; torch.cuda's fallback figure
    # was read after, and already excludes it.
    after_init = info.source.startswith("torch.cuda")
    context = 0 if after_init else measure_cuda_context_bytes(device.index, free_before_bytes=info.free_bytes)
    if emulate_cap is not None:
        # On the real card the context comes out of its capacity before the allocator gets any.
        ctx = context if context else ASSUMED_CONTEXT_BYTES
        device.set_memory_cap(max(2**20, emulate_cap - ctx))
        info = info.model_copy(update={"total_bytes": emulate_cap, "free_bytes": min(info.free_bytes, emulate_cap),
                                       "note": EMULATE_NOTE})
    return info, compute_budget(info, margin, context_bytes=context)


BIG_FOR_CPU = 20_000_000  # parameters: above this, real trials on a CPU take minutes each


def probe_on(cfg, device, info, budget, opts: ProbeOptions, log: Callable[[str], None]) -> ProbeResult:
    """The measured probe on an opened device whose budget is known."""
    from autofit.estimate import ModelShape, param_count
    from autofit.units import fmt_bytes
    log(f"probing on {info.name} ({info.kind}), budget {fmt_bytes(budget.budget_bytes)}")
    n = param_count(ModelShape.from_config(cfg))
    if info.kind == "cpu" and n > BIG_FOR_CPU and opts.device is None:
        log(f"no GPU found: measuring a {n / 1e6:.0f}M-parameter model with real trials on the CPU will be slow; "
            f"for a GPU you do not have here, estimate with --gpu NAME (e.g. --gpu rtx4070-12gb)")
    space = candidate_space(cfg, "cpu" if info.kind == "cpu" else "cuda", info.bf16_supported, dtype=opts.dtype,
                            compile=opts.compile, checkpointing=opts.checkpointing, loss_impls=opts.loss_impls)
    settings = TrialSettings(steps=opts.trial_steps, compile_backend=opts.compile_backend, seed=cfg.seed)
    result = probe_measured(cfg, device, budget, space, settings=settings, log=log)
    result.device = info
    return result


def run_probe(cfg, opts: ProbeOptions, log: Callable[[str], None] = lambda s: None):
    """Returns (ProbeResult, device or None, hardware spec or None)."""
    if opts.gpu is not None:
        from autofit.hardware import get_hardware
        hw = get_hardware(opts.gpu)
        if opts.device is not None or opts.budget_bytes is not None:
            raise DeviceError("--gpu simulates a card from its profile; it cannot be combined with --device/--budget")
        info = simulated_info(hw)
        space = candidate_space(cfg, "cuda", info.bf16_supported, dtype=opts.dtype, compile=opts.compile,
                                checkpointing=opts.checkpointing, loss_impls=opts.loss_impls)
        budget = compute_budget(info, opts.margin)
        return probe_estimated(cfg, info, hw, budget, space), None, hw
    device = open_device(opts)
    info = device_info(device)
    if info.kind == "cuda":
        info, budget = prepare_cuda(device, info, opts.margin, opts.emulate_bytes)
    else:
        budget = compute_budget(info, opts.margin)
    return probe_on(cfg, device, info, budget, opts, log), device, None
