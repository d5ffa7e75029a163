"""Turns a GPU self-check's OUT directory (stage0_env.json ... stage3_train.json, written by
scripts/gpu_selfcheck.sh) into the markdown that docs/gpu-selfcheck.md records: a heading with
the card, driver, torch, CUDA, date and commit, one table row per check, and the figures (each
saying it was measured, and how). Writes OUT/report.md and prints it.

    python scripts/selfcheck_report.py OUT [--stages "0 1 2 3 4"]

Exit status 0 when every requested stage left a record and no check failed (skips are fine, as
in a dry run), else 1.

A stage 2 stopped at its limit before the probe saved its profile has no trial table in its
JSON; its trials are then read from OUT/stage2_trials.jsonl, where the probe appended each
trial's full record as it ended (AUTOFIT_TRIALS_JSONL), and shown the same way.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "selfcheck"))
from figures import trial_rows  # noqa: E402  (the stage's own rows, so both tables agree)
from common import git_commit  # noqa: E402
from roofline import LABEL, Roofline, ratio  # noqa: E402

# the device's reports (3 s each) leave the roofline out: it imports torch (scripts/selfcheck/roofline.py)
NO_ROOFLINE = (f"{LABEL}: not computed here (--no-roofline: the device's reports leave it out, as it imports "
               f"torch); run scripts/selfcheck_report.py on a copy of OUT off the device to add it")

NAMES = {0: "env", 1: "device", 2: "probe", 3: "train", 4: "ranks"}


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "-"


def mib(n, fmt: str = ",.0f") -> str:
    return f"{n / 2**20:{fmt}} MiB" if isinstance(n, (int, float)) else "-"


def pct(x) -> str:
    return f"{x:+.1%}" if isinstance(x, (int, float)) else "-"


def num(x, fmt=",.0f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def est_cells(measured, est: dict | None) -> str:
    """The estimated tokens/s (and its bound) and measured / estimated, two table cells."""
    if not est:
        return "- | -"
    r = ratio(measured, est)
    return f"{num(est['tokens_per_s'])} ({est['bound']}) | {num(r, '.2f') + 'x' if r else '-'}"


def estimates_line(roof: Roofline | None) -> str:
    return roof.words() if roof is not None else NO_ROOFLINE


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def load(out: Path, stages: list[int]) -> dict[int, dict | None]:
    recs = {}
    for n in stages:
        path = out / f"stage{n}_{NAMES[n]}.json"
        try:
            recs[n] = json.loads(path.read_text())
        except (OSError, ValueError):
            recs[n] = None
    return recs


def heading(recs: dict, on_device: bool = True) -> list[str]:
    env = recs.get(0) or {}
    card = (recs.get(1) or {}).get("card") or {}
    started = next((r["started"] for r in recs.values() if r and r.get("started")), "?")
    dry = any(r and r.get("dry_run") for r in recs.values())
    if card:
        what = (f"{card['name']} ({gib(card['total_bytes'])}, cc {'.'.join(map(str, card['compute_capability']))}), "
                f"driver {card['driver']} (CUDA {card['cuda_driver_api']}), torch {card['torch']} "
                f"(CUDA {card['cuda_build']}, cuDNN {card['cudnn']})")
    elif dry:
        what = f"no GPU (dry run), torch {env.get('torch', '?')}, CUDA build {env.get('cuda_build')}"
    else:
        what = f"card not identified (stage 1 has no card record), torch {env.get('torch', '?')}"
    # without stage 0 (SELFCHECK_STAGES="1 2 3"), the process writing the report says both where it
    # runs on the same machine, Python and checkout as the stages (on the device); a report made
    # later from a copy (the roofline's columns: off the device) does not know them (t10's L1)
    here = (platform.python_version(), git_commit(Path(__file__).resolve().parents[1]))
    python = env.get("python") or (here[0] if on_device else "? (not recorded)")
    commit = env.get("commit") or (here[1] if on_device else f"? (not recorded; this checkout is {here[1]})")
    lines = [f"### {started[:10]}: {what}", "",
             f"Python {python}, commit {commit}, started {started}"
             + ("; **dry run**: CUDA stages skipped" if dry else ""), ""]
    return lines


def check_rows(recs: dict) -> list[str]:
    lines = ["| stage | check | result | detail |", "| --- | --- | --- | --- |"]
    for n, rec in recs.items():
        if rec is None:
            lines.append(f"| {n} | stage {NAMES[n]} left a record | FAIL | no stage{n}_{NAMES[n]}.json (crashed before writing) |")
            continue
        for s in rec.get("skipped", []):
            lines.append(f"| {n} | {cell(s['what'])} | SKIP | {cell(s['reason'])} |")
        for c in rec.get("checks", []):
            lines.append(f"| {n} | {cell(c['check'])} | {c['result']} | {cell(c.get('detail', ''))} |")
        lines.append(f"| {n} | stage {NAMES[n]} status | {rec.get('status')} | {rec.get('seconds', '?')} s |")
    return lines + [""]


def device_figures(rec: dict | None) -> list[str]:
    steps = (rec or {}).get("outside_allocator") or {}
    if not steps:
        return []
    lines = ["Memory outside the caching allocator (measured; " + cell(steps["context"]["how"]) + "):", "",
             "| after | outside allocator | reserved | NVML, this process |", "| --- | --- | --- | --- |"]
    for name, s in steps.items():
        lines.append(f"| {name.replace('_', ' ')} | {mib(s['outside_allocator_bytes'])} | {mib(s['reserved_bytes'])} "
                     f"| {mib(s.get('nvml_process_bytes'))} |")
    backends = rec.get("sdpa_backends") or {}
    if backends:
        lines += ["", "SDPA backends, causal bf16 fwd+bwd, 4 x 12 heads x 1024 x 64: "
                  + "; ".join(f"{k}: {cell(v)}" for k, v in backends.items())]
    if rec.get("sdpa_default"):
        lines += ["", f"SDPA backend torch picks by default (torch._fused_sdp_choice): {rec['sdpa_default']}; cuDNN "
                      f"{rec.get('cudnn_version')}" + (f"; stages 2-3 ran with {rec['env_for_later_stages']}"
                                                       if rec.get("env_for_later_stages") else "")]
    if rec.get("allocator"):
        a = rec["allocator"]
        lines += ["", f"Allocator (measured after its first allocation): setting {a.get('env')!r}, "
                      f"expandable segments {a.get('expandable')}, settings {cell(a.get('settings'))}"]
    return lines + [""]


def finished_trials(out: Path, rec: dict | None) -> list[dict]:
    """Stage 2's trial rows from the records the probe appended to OUT/<trials_file> as each trial
    ended (a stage stopped before the profile was saved); [] when there are none."""
    path = out / ((rec or {}).get("trials_file") or "stage2_trials.jsonl")
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a SIGKILL: that trial is not finished
            continue
    return trial_rows([r for r in records if r.get("type") == "trial"], slack=(rec or {}).get("estimate_slack") or 0.0)


def probe_config(rec: dict | None) -> dict | None:
    """The probed model's config: the fitted profile's summary, else the run's own record."""
    runs = [r for r in (rec or {}).get("raw_metrics") or [] if r.get("type") == "run"]
    return (rec or {}).get("config_summary") or (runs[-1].get("config") if runs else None)


def probe_figures(rec: dict | None, out: Path | None = None, roof: Roofline | None = None) -> list[str]:
    trials = (rec or {}).get("trials") or []
    source = "peaks measured on this device; estimates from autofit's closed form"
    if not trials and out is not None and (trials := finished_trials(out, rec)):
        source += (f"; read from {(rec or {}).get('trials_file') or 'stage2_trials.jsonl'}, the trials that "
                   f"finished before the stage was stopped (the probe saved no profile)")
    if not trials:
        return []
    lines = [f"Trials ({source}):", "",
             "| micro | dtype | loss | ckpt | status | estimated (allocated) | measured | error | estimated "
             f"(reserved) | reserved | error | tokens/s measured | tokens/s {LABEL} | measured / estimated "
             "| left allocated | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cfg = probe_config(rec)
    for t in trials:
        lines.append(f"| {t['micro_batch']} | {t['dtype']} | {t['loss_impl']} | {t['checkpointing']} | {t['status']} "
                     f"| {gib(t.get('estimated_allocated_bytes', t['estimated_peak_bytes']))} "
                     f"| {gib(t['measured_peak_bytes'])} | {pct(t['estimate_error'])} "
                     f"| {gib(t['estimated_peak_bytes'])} | {gib(t.get('measured_reserved_bytes'))} "
                     f"| {pct(t.get('reserved_estimate_error'))} "
                     f"| {num(t.get('tokens_per_s'))} "
                     f"| {est_cells(t.get('tokens_per_s'), roof.trial(t, cfg) if roof else None)} "
                     f"| {mib(t.get('leaked_bytes'), '.1f')} | {cell(t.get('note') or '')} |")
    lines += ["", f"Tokens/s: measured, the fastest of the trial's timed steps (its micro-batches and the update); "
                  f"{estimates_line(roof)}" + ("" if roof is None or roof.problem or cfg else
                                               "; no model config recorded, so no trial has one")]
    p = rec.get("plan") or {}
    if p:
        lines += ["", f"Plan: {p.get('split')}, {p.get('dtype')}, loss {p.get('loss_impl')}, "
                      f"{'measured' if p.get('measured_peak_bytes') else 'estimated'} peak "
                      f"{gib(p.get('measured_peak_bytes') or p.get('estimated_peak_bytes'))} of a "
                      f"{gib(p.get('budget_bytes'))} budget; {cell(p.get('reason', ''))}"]
    if rec.get("estimate_error_max") is not None:
        lines.append(f"Allocated estimate vs allocated peak over {rec['estimate_error_n']} fitting trials: "
                     f"max |error| {rec['estimate_error_max']:.1%}, median {rec['estimate_error_median']:.1%}.")
    return lines + [""]


def train_figures(rec: dict | None, roof: Roofline | None = None) -> list[str]:
    f = (rec or {}).get("figures") or {}
    if not f:
        return []
    est = roof.phases(rec) if roof else {}
    mfu = lambda x: f"{x:.1%}" if isinstance(x, (int, float)) else "-"  # noqa: E731
    peak = f"{f['peak_tflops']} TFLOP/s dense {f['dtype']}" if f.get("peak_tflops") else "no peak"
    return ["Training (" + cell(f["how"]) + "):", "",
            f"| phase | tokens/s measured | tokens/s {LABEL} | measured / estimated | MFU | steps used |",
            "| --- | --- | --- | --- | --- | --- |",
            *(f"| {p} | {num(f[p + '_tokens_per_s'])} | {est_cells(f[p + '_tokens_per_s'], est.get(p))} "
              f"| {mfu(f[p + '_mfu'])} | {f[p + '_steps_used']} |" for p in ("eager", "compiled")),
            "", f"FLOPs/token {num(f['flops_per_token'], '.3e')} ({cell(f['flops_formula'])}); card peak: {peak} "
                f"({cell(f['peak_source'])}); first compiled step took {num(f['first_compiled_step_minus_steady_s'], '.1f')} s "
                f"more than a steady one; peak allocated {gib(f.get('peak_mem_bytes_max'))}.", "",
            f"Tokens/s {estimates_line(roof)}" + ("" if roof is None or roof.problem else
                                                  "; each steady step's own split; compile changes only the host "
                                                  "floor (compiled blocks: inductor's launches, no per-op cost), so "
                                                  "a compute-bound compiled row's estimate is the eager one's"), ""]


def ranks_figures(rec: dict | None) -> list[str]:
    """Stage 4's plan for 2 ranks and its tokens/s (measured), when it ran."""
    plan, f = (rec or {}).get("plan") or {}, (rec or {}).get("figures") or {}
    if not plan:
        return []
    return ["Two ranks (measured; one plan agreed by both):", "",
            f"- plan: {plan.get('world_size')} ranks, {plan.get('parallelism')}, micro-batches {plan.get('micro_batches')} "
            f"per rank; budget {mib(plan.get('budget_bytes'))} (the smaller rank's), measured peak "
            f"{mib(plan.get('measured_peak_bytes'))}",
            f"- tokens/s (both ranks): {num(f.get('tokens_per_s_median'))} ({f.get('how', '')})", ""]


def report(out: Path, stages: list[int], roofline: bool = True) -> tuple[str, int]:
    """The markdown and the exit status (module docstring). `roofline`: put the roofline's estimated
    tokens/s beside the measured ones (scripts/selfcheck/roofline.py; it imports torch)."""
    recs = load(out, stages)
    roof = Roofline(recs) if roofline and (recs.get(2) or recs.get(3)) else None
    lines = heading(recs, on_device=not roofline) + check_rows(recs) + device_figures(recs.get(1)) + probe_figures(recs.get(2), out, roof) \
        + train_figures(recs.get(3), roof) + ranks_figures(recs.get(4))
    failed = [n for n, r in recs.items() if r is None or r.get("status") != "ok"]
    lines.append(f"Result: {'all stages ok' if not failed else 'not ok in stage(s) ' + ', '.join(map(str, failed))}.")
    return "\n".join(lines) + "\n", 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--stages", default="0 1 2 3 4")
    ap.add_argument("--quiet", action="store_true", help="write report.md only (the script's per-stage reports)")
    ap.add_argument("--no-roofline", action="store_true", help="leave out the roofline's estimated tokens/s (it "
                    "imports torch: the device's 3 s reports)")
    a = ap.parse_args()
    try:
        stages = [int(s) for s in a.stages.split()]
        if any(s not in NAMES for s in stages):
            raise ValueError
    except ValueError:
        print(f"selfcheck_report: --stages takes stage numbers 0-4, got {a.stages!r}", file=sys.stderr)
        return 2
    text, rc = report(a.out, stages, roofline=not a.no_roofline)
    tmp = a.out / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(a.out / "report.md")
    if not a.quiet:
        print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
