"""The roofline's estimated tokens/s beside the self-check's measured ones: what autofit's estimated
mode (autofit/planning/throughput.py, the roofline `autofit probe --gpu NAME` plans with) predicts
for the same model, dtype, levers and step that stage 2's trials and stage 3's steady steps
measured, on the card the self-check ran on, so a GPU run says how far the roofline is off.

Computed by the report (scripts/selfcheck_report.py), from the recorded figures only: nothing runs
on a device. It imports autofit's planning modules, and with them torch, which takes longer than
the report's 3 s on the device, so the device's reports skip it (--no-roofline) and the report is
written again off the device (docs/gpu-selfcheck.md, "Recording the figures").

The card's spec is a built-in hardware profile (autofit/devices/profiles), found as autofit finds
one for a card it sees (autofit.devices.hardware.match_hardware: the slug of the NVML name and
memory, else the NVML name with memory within 5 %), but built-ins only: a user's own profile on
the machine writing the report must not change the figure.
"""
from __future__ import annotations

import statistics
from types import SimpleNamespace

from figures import steady_steps

# what every estimated figure is labelled with (the report's column headers and notes)
LABEL = "estimated (roofline)"
BOUNDS = {"compute": "compute", "memory bandwidth": "memory", "host overhead": "host"}


def card_spec(name: str | None, total_bytes: int | None):
    """(the built-in HardwareSpec of the card NVML named `name` with `total_bytes`, or None; how)."""
    if not name or not total_bytes:
        return None, "no card recorded (stage 1 names it; stage 3 too, on a GPU)"
    from autofit.devices.hardware import load_builtin, spec_named
    spec = spec_named(name, total_bytes, load_builtin())  # built-ins only: a user's figures are not checked
    if spec is None:
        return None, f"no built-in hardware profile names {name!r} with {total_bytes / 2**30:.1f} GiB"
    return spec, f"built-in hardware profile {spec.name}, for {name!r} as recorded"


def model_shape(cfg: dict):
    """autofit's ModelShape of a recorded config (a run record's `config`, a profile's
    config_summary); options it leaves out are GPT-2's, as ModelShape.from_config fills them."""
    from autofit.planning.estimate import ModelShape
    return ModelShape.from_config(SimpleNamespace(**{"dropout": 0.0, "bias": False, **cfg}))


def torch_has_lce(version: str | None) -> bool | None:
    """Whether the torch a run recorded ('2.11.0+cu130') has F.linear_cross_entropy (>= 2.13), which
    its chunked loss then ran; None when not recorded (the roofline then asks this machine's torch)."""
    try:
        return tuple(int(x) for x in str(version).split("+")[0].split(".")[:2]) >= (2, 13)
    except ValueError:
        return None


def step_estimate(shape, micro_batches: list[int], dtype: str, checkpointing: int, policy: str, hw,
                  tf32: bool, **host) -> dict:
    """The roofline's tokens/s of one optimizer step of `micro_batches` (sequences each): the
    step's tokens over the sum of each micro-batch's floors, the update shared among them by
    sequences (as autofit.planning.estimated prices a plan's step), and which floor bounds the
    largest micro-batch. `host`: step_floors' compiled, loss_impl, ce_chunk_size, torch_lce. An
    estimate, never a measurement."""
    from autofit.planning.throughput import step_floors
    batch = sum(micro_batches)
    floors = [step_floors(shape, m, dtype, checkpointing, hw, policy, tf32, batch, **host) for m in micro_batches]
    return {"tokens_per_s": batch * shape.block_size / sum(f.seconds for f in floors),
            "bound": BOUNDS[floors[micro_batches.index(max(micro_batches))].bound], "micro_batches": micro_batches}


def ratio(measured, estimated: dict | None) -> float | None:
    """measured / estimated tokens/s: above 1, the card ran faster than the roofline says."""
    if not measured or not estimated:
        return None
    return measured / estimated["tokens_per_s"]


class Roofline:
    """The report's estimates for one OUT's records (`recs`: stage number -> JSON or None).
    `problem` says why there are none (None when there are)."""

    def __init__(self, recs: dict):
        self.hw = None
        self.problem: str | None = None
        s1, s3 = recs.get(1) or {}, recs.get(3) or {}
        card = s1.get("card") or s3.get("card") or {}
        self.torch_lce = torch_has_lce(card.get("torch") or (recs.get(0) or {}).get("torch"))
        try:
            from autofit.planning.throughput import rate_words
            self.hw, self.source = card_spec(card.get("name"), card.get("total_bytes"))
            self.rate_words = rate_words(self.hw)
        except (ImportError, AttributeError, TypeError) as e:  # autofit's planning moved: say so, report the rest
            self.problem = f"autofit's roofline could not be loaded ({type(e).__name__}: {e})"
            return
        if self.hw is None:
            self.problem = self.source

    def words(self) -> str:
        """How every estimated figure was made, for the line under a table."""
        if self.problem:
            return f"{LABEL}: not computed: {self.problem}"
        from autofit.planning.throughput import ASSUMED_MFU, FILL_TOKENS
        hw = self.hw
        return (f"{LABEL}: autofit's estimated mode (autofit/planning/throughput.py) for {self.source} "
                f"({hw.peak_bf16_tflops:g} TFLOP/s bf16 dense, {hw.memory_bandwidth_gbs or 0:g} GB/s): "
                f"{self.rate_words}; computed when this report was written, from the recorded model, dtype, "
                f"levers and step; bound: the floor that sets the largest micro-batch's time; measured / "
                f"estimated above 1: the card ran faster than estimated; the compute floor runs at "
                f"{ASSUMED_MFU:.0%} MFU times the step's token fill, tokens / (tokens + {FILL_TOKENS}) (e.g. "
                f"{ASSUMED_MFU * 8192 / (8192 + FILL_TOKENS):.0%} MFU at 8 x 1024 tokens), the figure to compare "
                f"with an MFU column")

    def trial(self, row: dict, cfg: dict | None) -> dict | None:
        """The estimate for stage 2's trial `row` (figures.trial_rows) of the model `cfg` (the
        fitted profile's config_summary): the trial's own timed step, autofit.planning.trials
        .trial_split of the effective batch (two micro-batches of its size, then the update).
        None for a trial that measured no tokens/s, or with no card or config."""
        if self.hw is None or not cfg or not row.get("tokens_per_s"):
            return None
        from autofit.planning.trials import trial_split
        split = trial_split(int(cfg.get("effective_batch") or row["micro_batch"]), int(row["micro_batch"]))
        return step_estimate(model_shape(cfg), split, row["dtype"], int(row.get("checkpointing") or 0),
                             row.get("checkpointing_policy") or "full", self.hw, bool(cfg.get("tf32", True)),
                             compiled=bool(row.get("compile")), loss_impl=row.get("loss_impl") or "standard",
                             ce_chunk_size=int(cfg.get("ce_chunk_size") or 4096), torch_lce=self.torch_lce)

    def phases(self, rec: dict | None) -> dict[str, dict | None]:
        """Stage 3's estimates, eager and compiled: the median over the steady steps the measured
        tokens/s took (figures.steady_steps) of each step's own split, the compiled steps' with
        the compiled blocks' host floor (the compute and memory floors know no compile)."""
        raw = (rec or {}).get("raw_metrics") or []
        runs = [i for i, r in enumerate(raw) if r.get("type") == "run"]
        if self.hw is None or not runs:
            return {"eager": None, "compiled": None}
        run = raw[runs[-1]]
        cfg = run.get("config") or {}
        trains = {r["step"]: r for r in raw[runs[-1]:] if r.get("type") == "train"}
        events = [r for r in raw[runs[-1]:] if r.get("type") == "event"]
        shape, dtype = model_shape(cfg), run.get("dtype") or cfg.get("dtype")
        out = {}
        for phase, steps in zip(("eager", "compiled"), steady_steps(trains, events)):
            host = {"compiled": phase == "compiled", "loss_impl": cfg.get("loss_impl") or "standard",
                    "ce_chunk_size": int(cfg.get("ce_chunk_size") or 4096), "torch_lce": self.torch_lce}
            ests = [step_estimate(shape, list(r["micro_batches"]), dtype, int(cfg.get("checkpointing") or 0),
                                  cfg.get("checkpointing_policy") or "full", self.hw, bool(cfg.get("tf32", True)), **host)
                    for r in steps if r.get("micro_batches")]
            out[phase] = {"tokens_per_s": statistics.median(e["tokens_per_s"] for e in ests), "bound": ests[0]["bound"],
                          "micro_batches": ests[0]["micro_batches"]} if ests else None
        return out
