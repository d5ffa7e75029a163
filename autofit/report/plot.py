"""`autofit probe --plot FILE`: peak memory against micro-batch, as a picture.

For each lever combination the probe searched (dtype x activation checkpointing x loss, and
FSDP2 or not on several ranks), the closed-form estimate (autofit.planning.estimate.estimate_peak,
for one rank of the plan's ranks) is drawn as a line over the micro-batch range, the trials'
measured peaks as points (compiled trials as squares beside the eager circles: compile has no
line of its own, since the estimate takes compile as eager), out-of-memory trials as crosses (at
their estimated peak: an OOM has no measured one), the budget as a horizontal line and the chosen
plan circled. Every legend entry says whether it is measured or estimated.

matplotlib is an optional dependency (`pip install -e ".[plot]"` in a checkout, or `pip install matplotlib`). Only its object API is used
(Figure + savefig, no pyplot), so no GUI backend is ever started and no global state is changed.
"""
from __future__ import annotations

import os
from pathlib import Path

from autofit.records import judged_peak
from autofit.units import GiB, MiB, fmt_bytes
from trainer.errors import install_hint

FORMATS = (".png", ".svg")
INSTALL = install_hint("plot", "matplotlib")
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class PlotError(ValueError):
    """A --plot target that cannot be written, or no matplotlib; one line."""


def check_plot_target(path: Path) -> None:
    """Before any probe: the file type is known, matplotlib imports, and the folder is writable.
    Raises PlotError."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise PlotError(f"--plot {path}: the file must end in .png or .svg")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(f"--plot needs matplotlib, which is not installed: {INSTALL}") from None
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PlotError(f"--plot {path}: folder {folder} does not exist")
    if path.is_dir():
        raise PlotError(f"--plot {path}: is a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PlotError(f"--plot {path}: folder {folder} is not writable")


def _line_key(t) -> tuple[str, int, str, str, bool]:
    """The estimate line a trial belongs to: (dtype, checkpointing, loss, checkpointing policy,
    FSDP2). Not compile: its estimate is the eager one (docs/estimator.md)."""
    return t.dtype, t.checkpointing, t.loss_impl, t.checkpointing_policy, t.sharded


def _combos(res) -> list[tuple[str, int, str, str, bool]]:
    """The estimate lines (_line_key) of every lever combination that ran, in the order first run."""
    seen: dict[tuple[str, int, str, str, bool], None] = {}
    for t in res.trials:
        if t.status != "pruned":
            seen.setdefault(_line_key(t), None)
    return list(seen)


def _sizes(res) -> list[int]:
    """Integer micro-batches from 1 to a little past the largest one tried, at most ~80 points."""
    top = max([t.micro_batch for t in res.trials] + [res.plan.micro_batch, 2])
    top = min(res.plan.effective_batch, max(top + 1, int(top * 1.25)))  # a rank runs at most its share
    step = max(1, top // 80)
    return sorted(set(range(1, top + 1, step)) | {top})


TWIN = 0.005  # two estimate lines this close at every micro-batch draw as one


def _close(a: list[int], b: list[int]) -> bool:
    """Every point of `a` within TWIN of `b`'s (relative): on the plot, one line over the other."""
    return len(a) == len(b) and all(abs(x - y) <= TWIN * max(x, y, 1) for x, y in zip(a, b))


def _points(ax, mine, res, color, levers: str, unit: int, labelled: set[str], ring: bool = False) -> None:
    """The trials of one estimate line: fits at their judged peak (reserved where measured, CUDA;
    compiled ones as squares), trials that ran and are no fit (over the budget, spilled, leaked)
    as triangles, OOMs as crosses (compiled: plus signs) at their estimated peak. `ring`: fits as
    larger hollow markers, around an earlier line's at the same place instead of over them."""
    what = " (reserved: what the budget judges)" if any(t.measured_reserved_bytes for t in res.trials) else ""

    def once(text: str) -> str | None:
        if text in labelled:
            return None
        labelled.add(text)
        return text
    for compiled, marker in ((False, "o"), (True, "s")):
        points = [t for t in mine if t.status == "fit" and t.measured_peak_bytes and t.compile == compiled]
        if points:
            ax.scatter([t.micro_batch for t in points], [judged_peak(t) / unit for t in points],
                       **(dict(facecolors="none", edgecolors=color, s=120) if ring else dict(color=color)),
                       marker=marker, zorder=3,
                       label=f"{levers}{', compiled' if compiled else ''}: measured on {res.device.name}{what}")
    over = [t for t in mine if t.status != "fit" and t.measured_peak_bytes]
    if over:
        ax.scatter([t.micro_batch for t in over], [judged_peak(t) / unit for t in over], color=color, marker="^",
                   s=60, zorder=3, label=once("ran, not a fit: over the budget, spilled or leaked (measured)"))
    for compiled, marker in ((False, "x"), (True, "+")):
        ooms = [t for t in mine if t.status == "oom" and t.compile == compiled]
        if ooms:
            ax.scatter([t.micro_batch for t in ooms], [(t.estimated_peak_bytes or res.budget.budget_bytes) / unit
                                                       for t in ooms], color=color, marker=marker, s=60, zorder=3,
                       label=once(f"out of memory{', compiled' if compiled else ''} (measured; drawn at its "
                                  f"{'eager ' if compiled else ''}estimated peak)"))


def build_figure(res, cfg):
    """A matplotlib Figure for a ProbeResult (autofit.planning.planner) of TrainConfig `cfg`; y in GiB
    (MiB when the budget is under 1 GiB, as on a small budgeted CPU device)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from autofit.planning.estimate import ModelShape, estimate_peak
    shape = ModelShape.from_config(cfg)
    kind = "cpu" if res.device.kind == "cpu" else "cuda"
    unit, unit_name = (GiB, "GiB") if res.budget.budget_bytes >= GiB else (MiB, "MiB")
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    sizes = _sizes(res)
    labelled: set[str] = set()  # the legend entries shared by every line, once
    drawn: dict[str, list[int]] = {}  # each estimate line drawn so far, by its levers
    world = res.plan.world_size
    rank_batch = res.plan.effective_batch  # each rank's share: a trial of m runs two micro-batches below it
    for i, key in enumerate(_combos(res)):
        color, style = colors[i % 10], ["-", "--", ":", "-."][i // 10 % 4]  # past 10 lines: the colours again, dashed
        dtype, ckpt, loss, policy, sharded = key
        sel = " selective" if policy == "selective" else ""
        levers = (f"{_SHORT[dtype]}, {'ckpt ' + str(ckpt) + sel if ckpt else 'no ckpt'}, {loss} loss"
                  + (", FSDP2" if sharded else ""))
        est = [estimate_peak(shape, m, dtype=dtype, checkpointing=ckpt, loss_impl=loss, device=kind,
                             checkpointing_policy=policy, world_size=world, parallelism="fsdp2" if sharded else "ddp",
                             ce_chunk_size=cfg.ce_chunk_size, n_micro=2 if rank_batch > m else 1,
                             step_batch=rank_batch).peak_bytes
               for m in sizes]
        # a line drawn over an earlier one (within TWIN of every point: 256 bytes apart hid one just
        # as well) would hide it: dotted, its label says whose it is, its fits drawn as rings
        twin = next((name for name, other in drawn.items() if _close(other, est)), None)
        ax.plot(sizes, [b / unit for b in est], color=color, linestyle=":" if twin else style,
                label=f"{levers}: estimated (closed form)" + (
                    "" if not twin else f", the same as {twin}'s" if drawn[twin] == est else f", within {TWIN:.1%} of {twin}'s"))
        drawn[levers] = est
        _points(ax, [t for t in res.trials if _line_key(t) == key], res, color, levers, unit, labelled, ring=bool(twin))
    ax.axhline(res.budget.budget_bytes / unit, color="black", linestyle="--",
               label=f"budget {fmt_bytes(res.budget.budget_bytes)} (free memory less reserves and margin)")
    p = res.plan
    peak = judged_peak(p) or p.estimated_peak_bytes or 0
    ck = f"ckpt {p.checkpointing}" + (" selective" if p.checkpointing_policy == "selective" else "") \
        if p.checkpointing else "no ckpt"
    ax.scatter([p.micro_batch], [peak / unit], s=400, facecolors="none", edgecolors="red", linewidths=2, zorder=4,
               label=f"plan: micro-batch {p.micro_batch}, {_SHORT[p.dtype]}, {ck}, {p.loss_impl} loss"
                     + (", compiled" if p.compile else "") + (", FSDP2" if p.parallelism == "fsdp2" else "")
                     + f" ({'measured' if p.measured_peak_bytes else 'estimated'} peak {fmt_bytes(peak)}"
                     + (" reserved)" if p.measured_reserved_bytes else ")"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # micro-batches are whole sequences
    ax.set_xlabel("micro-batch (sequences)")
    ax.set_ylabel(f"peak memory ({unit_name})")
    ax.set_title(f"{res.device.name}: peak memory per micro-batch ({res.mode})")
    ax.set_ylim(bottom=0, top=max(res.budget.budget_bytes, peak) / unit * 1.6)
    # Below the axes: the lines it names stay visible.
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    return fig


def plot_probe(res, cfg, path: Path) -> Path:
    """Draw `res` to `path` (.png or .svg), atomically (trainer.writes.atomic_write: temp file,
    fsync, rename). Raises PlotError (one line: the disk's reason, and that the plan is printed)."""
    from trainer.writes import WriteError, atomic_write
    path = Path(path)
    fig = build_figure(res, cfg)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lower().lstrip(".")), what=f"--plot {path}",
                     kept="the plan is printed without it")
    except WriteError as exc:
        raise PlotError(str(exc)) from None
    return path
