"""The tables of `autofit probe -v` and the memory bar of every probe: the budget's terms, every
candidate tried (its estimated and measured peak, tokens/s, status and why), and where the plan's
memory goes. Every figure says whether it was measured on this device or estimated
(autofit.report.render prints the rest of a probe's output and calls these)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from autofit.units import fmt_bytes
from trainer.model.sac_ops import saved_ops_words

STATUS_STYLE = {"fit": "green", "oom": "red", "over_budget": "yellow", "spill": "magenta",
                "pruned": "dim", "error": "bold red"}

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# A -v row whose tokens/s the contest's re-timings moved after its trial line was printed.
RETIMED_NOTE = "tokens/s after the contest's re-timings: more steps than its trial line had"
# What a simulated probe says of compile, everywhere it shows it.
COMPILE_NOT_ESTIMATED = "its memory effect is not estimated: the figures are for eager"


def bytes_cell(n: int | None) -> str:
    """A table cell of bytes: fmt_bytes, '-' for none."""
    return fmt_bytes(n) if n else "-"


def budget_table(res, console: Console) -> None:
    """-v's budget table: each term of the probe's budget (given, measured or assumed, as its 'how'
    says), in bytes, down to what the plan may use."""
    bt = Table(title="budget", show_header=True)
    bt.add_column("term")
    bt.add_column("bytes", justify="right")
    bt.add_column("how")
    for t in res.budget.terms:
        bt.add_row(t.label, ("-" if t.bytes < 0 else "") + fmt_bytes(abs(t.bytes)) if t.bytes else "", t.how)
    bt.add_row("[bold]budget[/]", f"[bold]{fmt_bytes(res.budget.budget_bytes)}[/]", "what the plan may use")
    console.print(bt)


def candidates_table(res, console: Console) -> None:
    """-v's table of every candidate the probe tried or pruned (ProbeResult.trials): its estimated
    and measured peak (allocated; reserved too on CUDA), tokens/s (measured: the run's figure of its
    fastest step; estimated: marked 'est.'), its status with a footnote saying why, and '>' on the
    plan's row."""
    from autofit.planning.contest import run_tokens_per_s
    d, p = res.device, res.plan
    estimated = res.mode == "estimated"
    tt = Table(title="candidates (est. = closed-form estimate; measured = " +
               ("torch CUDA allocator's allocated peak; reserved: its reserved peak, judged against the budget"
                if d.kind == "cuda" else "budgeted-CPU live-bytes tracker" if d.kind == "cpu"
                else "nothing: simulated") + ")")
    # CUDA: the caching allocator's reserved peak beside allocated; it is what the budget judges
    reserved = any(t.measured_reserved_bytes for t in res.trials)
    cols = ("", "micro", "dtype", "compile", "ckpt", "loss", "est. peak", "measured",
            *(("reserved",) if reserved else ()), "tokens/s", "status")
    for col in cols:
        tt.add_column(col, justify="right" if col in ("micro", "est. peak", "measured", "reserved", "tokens/s")
                      else "left")
    notes: list[str] = []
    if estimated and p.compile:
        # Simulated rows are estimated eager; the plan compiles, so the table shows compile as the
        # plan will run it, and says once that its memory effect is not in the figures.
        notes.append(f"compile as the plan will run it (after {p.compile_after} eager steps); {COMPILE_NOT_ESTIMATED}")
    for t in res.trials:
        chosen = (t.dtype == p.dtype and (t.compile == p.compile or estimated)
                  and t.micro_batch == p.micro_batch
                  and t.checkpointing == p.checkpointing and t.loss_impl == p.loss_impl and t.status == "fit"
                  and t.checkpointing_policy == p.checkpointing_policy
                  and t.sharded == (p.parallelism == "fsdp2"))
        tps = "-" if not t.tokens_per_s else (f"{t.tokens_per_s:,.0f} est." if estimated else f"{run_tokens_per_s(t):,.0f}")
        note = row_note(t, p, estimated, chosen)
        status = f"[{STATUS_STYLE.get(t.status, '')}]{t.status.replace('_', ' ')}[/]"
        if note and note not in notes:
            notes.append(note)
        if note:
            status += f" [dim]({notes.index(note) + 1})[/]"
        compile_cell = "on" if t.compile else "off"
        if estimated:
            compile_cell = "on (1)" if p.compile else "off"
        tt.add_row("[bold]>[/]" if chosen else "", str(t.micro_batch), SHORT_DTYPE[t.dtype], compile_cell,
                   ckpt_cell(t), t.loss_impl + (" +fsdp2" if t.sharded else ""),
                   bytes_cell(t.estimated_peak_bytes),
                   bytes_cell(t.measured_peak_bytes), *((bytes_cell(t.measured_reserved_bytes),) if reserved else ()), tps, status)
    console.print(tt)
    if not estimated:
        console.print("  [dim]tokens/s: the trial's fastest step by wall time (of all its readings, re-timings too), "
                      "its optimizer update paid once per effective batch as the run pays it (the plan line's 'fastest step'; "
                      "its tokens/s is the median step)"
                      + ("; the contest judged CPU time per token, which other processes' load does not inflate while "
                         "cores are free (oversubscribed, a waiting thread spins, and it does)"
                         if d.kind == "cpu" else "") + "[/]")
    for i, n in enumerate(notes, 1):
        console.print(f"  [dim]({i}) {n}[/]")
    if any(t.checkpointing_policy == "selective" and t.checkpointing for t in res.trials):
        console.print(f"  [dim]ckpt 'k sel': every k-th block checkpointed, selective: {saved_ops_words()}[/]")
    for n in getattr(res, "notes", []):  # levers the search left out, and why
        console.print(f"  [dim]{n}[/]")


def row_note(t, p, estimated: bool, chosen: bool) -> str:
    """The -v table's footnote for `t`'s row: why it did not fit, compile time, re-timings; for the
    `chosen` row of a plan `p` mixing sizes (14 x 9 + 13 x 10), the plan line's figure where it is
    not the row's (t12's L3: the row said 22,450 est., the plan 22,392)."""
    from autofit.planning.contest import run_tokens_per_s
    parts = [t.note] if t.note and (t.status != "fit" or not estimated) else []
    if t.compile_seconds is not None:
        parts.append(f"compile took {t.compile_seconds:.1f} s (apart from step time)")
    if t.retimed_steps:  # its trial line printed the fastest of its own steps, before these
        parts.append(RETIMED_NOTE)
    row, plan = (t.tokens_per_s, p.tokens_per_s) if estimated else (run_tokens_per_s(t), p.fastest_tokens_per_s)
    if chosen and set(p.micro_batches) != {t.micro_batch} and row and plan and round(row) != round(plan):
        parts.append(f"the plan runs {p.split}, not {t.micro_batch} alone: {plan:,.0f} tokens/s"
                     f"{'' if estimated else ' at its fastest step'}, the plan line's figure")
    return "; ".join(parts)


def ckpt_cell(t) -> str:
    """The candidates table's ckpt cell: 'off', '1' (full), '1 sel' (selective)."""
    if not t.checkpointing:
        return "off"
    return f"{t.checkpointing}" + (" sel" if t.checkpointing_policy == "selective" else "")


def render_breakdown(breakdown: dict[str, int], budget: int, measured: int | None, console: Console,
                     width: int = 50) -> None:
    """A bar of the plan's memory by component (estimated) against the budget."""
    total = sum(breakdown.values())
    scale = max(budget, total, measured or 0)
    console.print("[bold]where the memory goes[/] (estimated by component; the bar is the budget, a color each "
                  "component; % of the estimated total)")
    colors = ["cyan", "blue", "magenta", "yellow", "red", "green", "bright_black", "white"]
    bar = ""
    for (name, n), color in zip(breakdown.items(), colors):
        cells = round(width * n / scale)
        bar += f"[{color}]" + "█" * cells + "[/]"
    used = sum(round(width * n / scale) for n in breakdown.values())
    bar += "░" * max(0, round(width * budget / scale) - used)
    console.print(f"  |{bar}| budget {fmt_bytes(budget)}")
    for (name, n), color in zip(breakdown.items(), colors):
        if n:
            label = name.replace("_", " ")  # 'optimizer state', not the breakdown's key (t7's L15)
            console.print(f"  [{color}]█[/] {label:<16} {fmt_bytes(n):>12}  {100 * n / max(total, 1):5.1f}%")
    line = f"  total (estimated) {fmt_bytes(total)}"
    if measured:
        line += f"; measured peak {fmt_bytes(measured)}"
    console.print(line)
