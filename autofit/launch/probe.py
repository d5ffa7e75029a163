"""`autofit probe`: open the device (a real GPU, the budgeted CPU, or a simulated GPU), work out
the budget, and run the planner in the matching mode: measured trials, or estimates alone."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from autofit.planning.budget import compute_budget, device_budget
from autofit.planning.candidates import candidate_space
from autofit.devices.device import DeviceError
from autofit.devices.host_load import WAIT_ENV, LoadMeter, openmp_wait_line
from autofit.devices.info import with_details
from autofit.devices.opener import open_device, open_simulated
from autofit.planning.estimated import probe_estimated
from autofit.planning.planner import ProbeResult, probe_measured
from autofit.planning.trials import TrialSettings


@dataclass
class ProbeOptions:
    device: str | None = None  # 'cuda' | 'cpu' | None (a GPU if there is one, else the CPU)
    budget_bytes: int | None = None  # CPU only
    gpu: str | None = None  # simulate this hardware profile: estimates only
    gpu_index: int | None = None  # --gpu-index; None: GPU 0 (and no complaint on the CPU)
    margin: float = 0.10
    dtype: str | None = None
    compile: bool | None = None
    checkpointing: list[int] | None = None
    checkpointing_policies: list[str] | None = None  # --checkpointing-policy; None: both where torch has selective
    loss_impls: list[str] | None = None
    emulate_bytes: int | None = None  # on a bigger GPU: cap the process to this many bytes
    trial_steps: int = 2
    compile_backend: str = "inductor"
    device_source: str | None = None  # where device and gpu_index came from, when not from flags

    def _levers_given(self) -> dict[str, object]:
        """{flag: value} of the lever flags given on the command line (the search's restrictions)."""
        given = {"--dtype": self.dtype, "--compile/--no-compile": self.compile, "--checkpointing": self.checkpointing,
                 "--checkpointing-policy": self.checkpointing_policies, "--loss": self.loss_impls}
        return {flag: v for flag, v in given.items() if v is not None}

    def search_words(self) -> list[str]:
        """The lever flags given, with their values ('--loss chunked', '--checkpointing 0'): what a
        plan fitted under them was restricted to (autofit.profiles.store.FittedPlan.searched_under)."""
        return [("--compile" if v else "--no-compile") if isinstance(v, bool)
                else f"{flag} {','.join(map(str, v)) if isinstance(v, list) else v}"
                for flag, v in self._levers_given().items()]

    def search_flags(self) -> list[str]:
        """The probe's search flags given on the command line (['--dtype', '--loss', ...], and
        --margin): what a run that does not probe (--no-probe, a resumed autofit run) would ignore."""
        return [*self._levers_given(), *(["--margin"] if self.margin != ProbeOptions.margin else [])]


PROBE_WAIT_ENV = "AUTOFIT_FAULT_PROBE_WAIT"


def _wait_if_asked() -> None:
    """AUTOFIT_FAULT_PROBE_WAIT=1 (a fault for tests of Ctrl-C and SIGTERM during the probe): the
    probe stops before its first trial, says so on stderr, and waits there for a signal, so a test
    interrupts a probe without guessing how long trials take on the machine."""
    if not os.environ.get(PROBE_WAIT_ENV):
        return
    print(f"probe waiting ({PROBE_WAIT_ENV} is set): interrupt it now", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


TRIALS_JSONL_ENV = "AUTOFIT_TRIALS_JSONL"


def trial_log() -> Callable:
    """The probe's on-trial hook (TrialSettings.on_trial). AUTOFIT_TRIALS_JSONL=FILE: each trial's
    full record (autofit.records.TrialRecord's fields: status, estimated, measured allocated and
    reserved peaks in bytes, leaked_bytes, tokens/s, step times, note; plus "type": "trial") is
    appended to FILE as one JSON line as soon as the trial ends, so a probe stopped from outside
    (a time limit's SIGKILL, as the GPU self-check's stage 2 may get) still leaves the record of
    every trial it finished. Unset: nothing is written. Raises WriteError (one line) when FILE
    cannot be written, before the first trial."""
    path = os.environ.get(TRIALS_JSONL_ENV)
    if not path:
        return lambda r: None
    import json

    from trainer.writes import append_lines
    what = f"{TRIALS_JSONL_ENV} file {path}"
    append_lines(path, [], what=what)  # tried now: refused before any trial, not after one

    def write(r) -> None:
        append_lines(path, [json.dumps({"type": "trial", **r.model_dump(mode="json")})], what=what)
    return write


BIG_FOR_CPU = 20_000_000  # parameters: above this, real trials on a CPU take minutes each


def fitted_config(cfg, log: Callable[[str], None] = lambda s: None):
    """The config the probe fits: `cfg` itself, or for a schedule of stages (trainer/config/stages.py)
    its largest stage as one ordinary config, said in `log`."""
    from trainer.config.stages import fitted_config as fitted, fitted_stage
    if cfg.stages:
        i = fitted_stage(cfg.stages)
        n = len(cfg.stages)
        log(f"schedule of {n} stage{'s' * (n != 1)}: fitting stages[{i}] ({cfg.stages[i].words()}), the largest "
            f"block size and so the most memory per sequence; the other stages run at most its tokens per micro-batch")
    return fitted(cfg)


def probe_space(cfg, device, opts: ProbeOptions):
    """The lever space the probe searches on an opened `device` with these options
    (autofit.planning.candidates.candidate_space). Raises PlanError for a flag it cannot honour."""
    from autofit.planning import agree
    info = device.info
    return candidate_space(cfg, "cpu" if info.kind == "cpu" else "cuda", info.bf16_supported, dtype=opts.dtype,
                           compile=opts.compile, checkpointing=opts.checkpointing, loss_impls=opts.loss_impls,
                           compile_measurable=device.capabilities.compile,
                           compute_capability=info.compute_capability, world_size=agree.ranks().world_size,
                           checkpointing_policies=opts.checkpointing_policies)


def probe_on(cfg, device, budget, opts: ProbeOptions, log: Callable[[str], None]) -> ProbeResult:
    """The measured probe on an opened device (autofit.devices.device.Device) whose budget is known."""
    from datetime import datetime, timezone
    started = datetime.now(timezone.utc)  # a run's lesson after it is newer than what the probe measured
    cfg = fitted_config(cfg, log)
    from autofit.planning.estimate import ModelShape, param_count
    from autofit.units import fmt_bytes, fmt_share
    from autofit.planning import agree
    on_trial = trial_log()  # AUTOFIT_TRIALS_JSONL, checked writable before anything is said or run
    info = device.info
    from trainer.distributed.ranks import signal_at
    ranks = agree.ranks()
    signal_at("budget", ranks)  # a test's fault: a Ctrl-C as rank 1 lags
    # several ranks: the smallest rank's budget, and that rank's device for the device line and the
    # profile a --save names and sizes (t8's M5); picked again if CUDA measures the budgets again
    bound = agree.bind(budget, info)
    budget = bound.budget
    space = agree.space(probe_space(cfg, device, opts))  # several ranks: what every rank's card can run
    # after the space: a lever this device cannot run (bf16 on a card without it) is refused first
    log(f"probing on {with_details(info.name, info.kind)}, budget {fmt_bytes(budget.budget_bytes)} "
        f"({fmt_bytes(budget.usable_bytes)} usable less the {fmt_share(budget.margin)} safety margin)"
        + (f" (the smallest of {ranks.world_size} ranks' budgets; each rank measures on its own device)"
           if ranks.several else ""))
    n = param_count(ModelShape.from_config(cfg))
    if info.kind == "cpu" and n > BIG_FOR_CPU and opts.device is None:
        log(f"no GPU found: measuring a {n / 1e6:.0f}M-parameter model with real trials on the CPU will be slow; "
            f"for a GPU you do not have here, estimate with --gpu NAME (e.g. --gpu rtx4070-12gb)")
    for note in space.notes:
        log(note)
    if info.kind == "cpu" and (said := openmp_wait_line()):
        log(said)  # why this probe's CPU-time figures hold under the load it started in
    _wait_if_asked()
    from trainer.interrupt import StopFlag
    notice = "autofit: stopping after the trial in flight (Ctrl-C again to stop now)"
    with StopFlag(notice) as stop:  # Ctrl-C/SIGTERM: the trial in flight ends, then the probe stops (a second: at once)
        settings = TrialSettings(steps=opts.trial_steps, compile_backend=opts.compile_backend, seed=cfg.seed,
                                 stop=lambda: stop.signal is not None, on_trial=on_trial)
        # several ranks: a rank that loses contact here after this stop signal stops as interrupted
        # (autofit.launch.torchrun.taken_as_stop), as at every other wait of the command
        signal_at("trials", ranks)  # a test's fault: a Ctrl-C as rank 1 lags
        with LoadMeter() as meter:
            res = probe_measured(cfg, device, budget, space, settings=settings, log=log, bound=bound)
        if agree.stop_wanted(stop.signal is not None):  # asked after the last trial that checked: no plan from it
            raise KeyboardInterrupt
    res.notes, res.started = list(space.notes), started
    # one process on the CPU only: several ranks' siblings would count as other processes' load
    said = load_words(meter.load) if info.kind == "cpu" and not ranks.several else None
    if said:
        log(said)
        res.notes.append(said)
    return res


def load_words(load, environ=os.environ) -> str | None:
    """The line a probe on the CPU adds when other processes oversubscribed the cores during its
    trials (autofit.devices.host_load.Load.busy), else None: its CPU-time figures were inflated
    by it, so the plan may not be the one a quiet machine would choose. Where OpenMP's waiting
    threads slept (OMP_WAIT_POLICY=PASSIVE in `environ`: autofit.devices.host_load.
    choose_openmp_wait), waiting for a core was not counted, and the line says so instead."""
    if load is None or not load.busy:
        return None
    if environ.get(WAIT_ENV, "").strip().upper() == "PASSIVE":
        return (f"load: {load.words()} while the trials ran; OpenMP's waiting threads slept ({WAIT_ENV}=PASSIVE), "
                f"so waiting for a core did not count in the CPU-time figures the contest judged (on a 2-core machine "
                f"at load 3-10 such probes chose the quiet machine's plan 9 times in 10); a quiet machine is surer")
    return (f"load: {load.words()} while the trials ran: on oversubscribed cores a thread waiting for a core "
            f"spins, so the CPU-time figures the contest judged grew with the load (up to 5-9x seen on a 2-core "
            f"machine) and this plan may not be the one a quiet machine picks; probe again when it is quiet, or "
            f"with {WAIT_ENV}=PASSIVE set (waiting threads then sleep)")


def run_probe(cfg, opts: ProbeOptions, log: Callable[[str], None] = lambda s: None, say_schedule: bool = True):
    """Returns (ProbeResult, device or None, hardware spec or None); `say_schedule`: False where the
    caller prints the schedule itself (`probe`'s stdout block, render.stage_lines), so `log` does
    not repeat which stage is fitted. Raises DeviceError, HardwareError or PlanError with one line."""
    cfg = fitted_config(cfg, log if say_schedule else lambda s: None)  # a staged config: its largest stage
    _check_vocab_where_data_is_here(cfg)
    if note := _default_vocab_note(cfg):
        log(note)
    if opts.gpu is not None:
        sim = open_simulated(opts.gpu)
        if opts.device is not None or opts.budget_bytes is not None or opts.gpu_index is not None:
            raise DeviceError("--gpu simulates a card from its profile; it cannot be combined with "
                              "--device/--budget/--gpu-index")
        info = sim.info
        space = candidate_space(cfg, "cuda", info.bf16_supported, dtype=opts.dtype, compile=opts.compile,
                                checkpointing=opts.checkpointing, loss_impls=opts.loss_impls,
                                compute_capability=info.compute_capability,
                                checkpointing_policies=opts.checkpointing_policies)
        budget = compute_budget(info, opts.margin)
        res = probe_estimated(cfg, info, sim.hw, budget, space)
        res.notes = list(space.notes)
        for note in space.notes:  # as a measured probe says them: a dtype of a --dtype list left out (t8's M4)
            log(note)
        return res, None, sim.hw
    device = open_device(opts.device, budget_bytes=opts.budget_bytes, gpu_index=opts.gpu_index,
                         emulate_usable_bytes=opts.emulate_bytes, source=opts.device_source)
    return probe_on(cfg, device, device_budget(device, opts.margin), opts, log), device, None


def _check_vocab_where_data_is_here(cfg) -> None:
    """Where the config's dataset is here, its token ids must fit vocab_size, as `run` checks
    before training (t7's M6: `probe --save` stored a plan for a config every run refuses). A probe
    needs no data (its trials draw random tokens), so a dataset that is not here, or not readable,
    is left for `run` to say. Raises DataError (one line)."""
    from trainer.data.datasets import load_dataset
    from trainer.data.tokenfiles import DataError
    try:
        data = load_dataset(cfg.dataset)
    except DataError:
        return
    data.check_vocab(cfg.vocab_size)


def _default_vocab_note(cfg) -> str | None:
    """A note where a character dataset's vocab_size is nanoGPT's default (50304) because the
    dataset is not here to give its own (meta.pkl, ~65): the logits, the largest activation of a
    small model, scale with it (a probe needs no data, so it goes on). Character datasets are
    known by nanoGPT's naming (shakespeare_char): a GPT-2 BPE dataset's default is its own, and a
    fine-tune's vocab is the published model's."""
    from pathlib import Path
    from trainer.data.datasets import dataset_dir
    if cfg.source_of("vocab_size") != "default" or cfg.init_from != "scratch" \
            or not Path(cfg.dataset).name.endswith("_char") or dataset_dir(cfg.dataset) is not None:
        return None
    return (f"note: vocab_size {cfg.vocab_size} is the default: dataset '{cfg.dataset}' is not here, and its meta.pkl "
            f"would give the number of its characters (65 for Tiny Shakespeare): --set vocab_size=N")
