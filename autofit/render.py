"""Human output of a probe: the trials, where the memory goes, and the plan. Every figure says
whether it was measured on this device or estimated."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from autofit.units import fmt_bytes

STATUS_STYLE = {"fit": "green", "oom": "red", "over_budget": "yellow", "spill": "magenta",
                "pruned": "dim", "error": "bold red"}


SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _b(n: int | None) -> str:
    return fmt_bytes(n) if n else "-"


def render_probe(res, console: Console) -> None:
    d = res.device
    src = "measured" if res.mode == "measured" else "ESTIMATED (no such GPU here; nothing was run)"
    console.print(f"[bold]device[/]: {d.name} ({d.kind}, {fmt_bytes(d.total_bytes)} total, "
                  f"{fmt_bytes(d.free_bytes)} free; source {d.source})")
    if getattr(d, "note", ""):
        console.print(f"  note: {d.note}")
    console.print(f"[bold]mode[/]: {src}")
    console.print(f"[bold]target[/]: {res.effective_batch} sequences x {res.block_size} tokens = "
                  f"{res.effective_batch * res.block_size:,} tokens per optimizer step (kept exact)")

    bt = Table(title="budget", show_header=True)
    bt.add_column("term")
    bt.add_column("bytes", justify="right")
    bt.add_column("how")
    for t in res.budget.terms:
        bt.add_row(t.label, ("-" if t.bytes < 0 else "") + fmt_bytes(abs(t.bytes)) if t.bytes else "", t.how)
    bt.add_row("[bold]budget[/]", f"[bold]{fmt_bytes(res.budget.budget_bytes)}[/]", "what the plan may use")
    console.print(bt)

    tt = Table(title="candidates (est. = closed-form estimate; measured = " +
               ("torch CUDA allocator peak" if d.kind == "cuda" else "budgeted-CPU live-bytes tracker" if d.kind == "cpu"
                else "nothing: simulated") + ")")
    for col in ("", "micro", "dtype", "compile", "ckpt", "loss", "est. peak", "measured", "tokens/s", "status"):
        tt.add_column(col, justify="right" if col in ("micro", "est. peak", "measured", "tokens/s") else "left")
    p = res.plan
    notes: list[str] = []
    for t in res.trials:
        chosen = (t.dtype == p.dtype and (t.compile == p.compile or res.mode == "estimated")
                  and (t.micro_batch == p.micro_batch or res.mode == "estimated")
                  and t.checkpointing == p.checkpointing and t.loss_impl == p.loss_impl and t.status == "fit"
                  and t.sharded == (p.parallelism == "fsdp2"))
        tps = "-" if not t.tokens_per_s else (f"{t.tokens_per_s:,.0f}" + (" est." if res.mode == "estimated" else ""))
        note = t.note if t.status != "fit" or res.mode == "measured" else ""
        if t.compile_seconds is not None:
            note = (note + "; " if note else "") + f"compile took {t.compile_seconds:.1f} s (apart from step time)"
        status = f"[{STATUS_STYLE.get(t.status, '')}]{t.status.replace('_', ' ')}[/]"
        if note and note not in notes:
            notes.append(note)
        if note:
            status += f" [dim]({notes.index(note) + 1})[/]"
        tt.add_row("[bold]>[/]" if chosen else "", str(t.micro_batch), SHORT_DTYPE[t.dtype], "on" if t.compile else "off",
                   str(t.checkpointing) if t.checkpointing else "off", t.loss_impl + (" +fsdp2" if t.sharded else ""),
                   _b(t.estimated_peak_bytes),
                   _b(t.measured_peak_bytes), tps, status)
    console.print(tt)
    for i, n in enumerate(notes, 1):
        console.print(f"  [dim]({i}) {n}[/]")

    render_breakdown(res.breakdown, res.budget.budget_bytes, p.measured_peak_bytes, console)

    console.print("[bold]plan[/] (" + ("measured" if res.mode == "measured" else "estimated") + ")")
    if p.world_size > 1:  # torchrun: one plan for every rank
        console.print(f"  {p.world_size} ranks, {p.parallelism}: effective batch {p.effective_batch * p.world_size} = "
                      f"{p.world_size} x {p.effective_batch} sequences per rank; each rank:")
    console.print(f"  micro-batch {p.micro_batch} x {p.grad_accum} accumulation steps: {p.split}")
    console.print(f"  dtype {p.dtype}, compile {'on after ' + str(p.compile_after) + ' eager steps' if p.compile else 'off'}, "
                  f"activation checkpointing {'every ' + str(p.checkpointing) + ' block(s)' if p.checkpointing else 'off'}, "
                  f"loss {p.loss_impl}")
    peak = f"measured peak {fmt_bytes(p.measured_peak_bytes)}" if p.measured_peak_bytes else \
        f"estimated peak {fmt_bytes(p.estimated_peak_bytes)}"
    tps = f"{p.tokens_per_s:,.0f} tokens/s ({'measured' if res.mode == 'measured' else 'estimated'})" \
        if p.tokens_per_s else "tokens/s unknown"
    console.print(f"  {peak} of a {fmt_bytes(p.budget_bytes)} budget; {tps}")
    console.print(f"  why: {p.reason}")


def render_breakdown(breakdown: dict[str, int], budget: int, measured: int | None, console: Console,
                     width: int = 50) -> None:
    """A bar of the plan's memory by component (estimated) against the budget."""
    total = sum(breakdown.values())
    scale = max(budget, total, measured or 0)
    console.print("[bold]where the memory goes[/] (estimated by component; bar = budget)")
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
            console.print(f"  [{color}]█[/] {name:<16} {fmt_bytes(n):>12}  {100 * n / max(total, 1):5.1f}%")
    line = f"  total (estimated) {fmt_bytes(total)}"
    if measured:
        line += f"; measured peak {fmt_bytes(measured)}"
    console.print(line)
