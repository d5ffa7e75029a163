"""What every self-check stage shares: its JSON record, written as it goes, and the autofit CLI.

Each stage writes OUT/stageN_*.json after every step it finishes (temp file, fsync, rename), so a
stage killed by its time limit still leaves what it measured; the orchestrator then marks the
record "timed_out". The stages reach autofit through its command line only (`python -m
autofit.cli.app ...`), never through its Python functions, which move as the code changes.
"""
from __future__ import annotations

import argparse

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

# The dry run's model: the tiny preset made smaller still (2 layers, 64 wide, 64 tokens, 32
# sequences a step), so the whole dry run stays near a minute on a busy 2-core machine.
DRY_MODEL = ["--preset", "tiny", "--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=64",
             "--set", "block_size=64", "--set", "batch_size=8", "--set", "gradient_accumulation_steps=4",
             "--set", "eval_interval=0"]


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a reader (or a time-out) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a last line cut short by a kill is dropped."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Stage:
    """The JSON record of one stage: status 'running' until finish(); checks are PASS/FAIL/SKIP
    lines with the figure or reason that decided them."""

    def __init__(self, out_dir: Path, number: int, name: str, dry_run: bool):
        self.path = Path(out_dir) / f"stage{number}_{name}.json"
        self.t0 = time.monotonic()
        self.rec: dict[str, Any] = {"stage": number, "name": name, "status": "running", "dry_run": dry_run,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checks": [],
                                    "skipped": []}
        self.save()

    def save(self) -> None:
        self.rec["seconds"] = round(time.monotonic() - self.t0, 1)
        write_json(self.path, self.rec)

    def set(self, **values: Any) -> None:
        self.rec.update(values)
        self.save()

    def check(self, name: str, ok: bool | None, detail: str = "") -> bool:
        """ok None: could not be decided (recorded as SKIP with the reason in `detail`)."""
        result = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        self.rec["checks"].append({"check": name, "result": result, "detail": detail})
        self.save()
        log(f"{result}  {name}" + (f": {detail}" if detail else ""))
        return bool(ok)

    def skip(self, what: str, reason: str) -> None:
        self.rec["skipped"].append({"what": what, "reason": reason})
        self.save()
        log(f"SKIP  {what}: {reason}")

    def finish(self) -> int:
        failed = [c for c in self.rec["checks"] if c["result"] == "FAIL"]
        self.rec["status"] = "failed" if failed else "ok"
        self.save()
        return 1 if failed else 0


def log(msg: str) -> None:
    print(msg, flush=True)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _pump(stream, sink, keep: list[str]) -> None:
    for line in stream:
        if sink is not None:
            sink.write(line)
            sink.flush()
        keep.append(line)


def run_cli(args: list[str], *, env: dict[str, str] | None = None, echo_stdout: bool = True,
            timeout: float | None = None, follow: Callable[[list[str]], None] | None = None) -> dict:
    """Runs `python -m autofit.cli.app ARGS` with this interpreter. Its stderr (and its stdout, unless
    `echo_stdout` is False, as for --json) is copied to ours as it comes, so the self-check log
    holds what a run printed before a time-out. Past `timeout` seconds the command gets SIGTERM
    (autofit then finishes its step and saves a checkpoint), SIGKILL 20 s later; the caller
    still reads whatever it wrote. `follow(lines)` is called every FOLLOW_S seconds while it runs
    and once after, with the output lines so far (the stages copy the run's raw records into
    their JSON with it, so a stage cut by its limit keeps them). Returns {cmd, rc, stdout, stderr_tail, seconds, timed_out}."""
    cmd = [sys.executable, "-m", "autofit.cli.app", *args]
    log("$ autofit " + " ".join(args))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    out_lines: list[str] = []
    err_lines: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout if echo_stdout else None, out_lines)),
             threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, err_lines))]
    for t in pumps:
        t.start()
    timed_out = False
    try:
        rc = _wait(proc, t0, timeout, follow and (lambda: follow(out_lines + err_lines)))
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"(stopping it: past its {timeout:.0f} s share of the stage's time)")
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    for t in pumps:
        t.join()
    if follow is not None:
        follow(out_lines + err_lines)
    return {"cmd": "autofit " + " ".join(args), "rc": rc, "stdout": "".join(out_lines), "timed_out": timed_out,
            "stderr_tail": tail("".join(err_lines)), "seconds": round(time.monotonic() - t0, 1)}


FOLLOW_S = 2.0


def _wait(proc: subprocess.Popen, t0: float, timeout: float | None, follow: Callable[[], None] | None) -> int:
    """proc.wait(timeout) measured from t0, calling `follow` every FOLLOW_S seconds meanwhile."""
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - t0)
        if left is not None and left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        step = FOLLOW_S if follow is not None else left
        try:
            return proc.wait(timeout=step if left is None or step is None else min(step, left))
        except subprocess.TimeoutExpired:
            if follow is not None:
                follow()


def follow_jsonl(st: "Stage", path: Path, key: str, types: tuple[str, ...] = ("run", "train", "event")):
    """A `follow` for run_cli: copies the records of `types` from the jsonl file at `path` into
    the stage's JSON under `key` (only when there are new ones)."""
    seen = [0]

    def copy(lines: list[str] | None = None) -> None:
        recs = [r for r in read_jsonl(path) if r.get("type") in types]
        if len(recs) != seen[0]:
            seen[0] = len(recs)
            st.set(**{key: recs})
    return copy


def follow_lines(st: "Stage", key: str, prefixes: tuple[str, ...]):
    """A `follow` for run_cli: copies the output lines that start with one of `prefixes` (the
    probe's 'trial: ...' and '  -> ...' lines, as it prints them) into the stage's JSON."""
    seen = [0]

    def copy(lines: list[str] | None = None) -> None:
        kept = [line.rstrip("\n") for line in (lines or []) if line.startswith(prefixes)]
        if len(kept) != seen[0]:
            seen[0] = len(kept)
            st.set(**{key: kept})
    return copy


def both(*follows):
    """Several `follow`s as one."""
    def call(lines: list[str] | None = None) -> None:
        for f in follows:
            f(lines)
    return call


def share_of(limit_s: float | None, keep_s: float = 25.0) -> float | None:
    """The time an inner command may take when its stage has `limit_s`: the rest is kept for
    reading back and judging what it wrote, so a slow run still leaves its figures."""
    return None if limit_s is None else max(10.0, limit_s - keep_s)


def cli_json(args: list[str], **kw) -> tuple[Any, dict]:
    """run_cli for a `--json` command: (parsed stdout or None, the run record)."""
    res = run_cli(args, echo_stdout=False, **kw)
    try:
        data = json.loads(res["stdout"]) if res["rc"] == 0 else None
    except json.JSONDecodeError:
        data = None
        res["stderr_tail"] += "\n(stdout was not JSON)"
    res.pop("stdout")
    return data, res


def requirements(pyproject: Path, extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """The core dependencies and those of `extras`, as written in pyproject.toml."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - pyproject installs tomli on 3.10
        import tomli as tomllib
    data = tomllib.loads(Path(pyproject).read_text())["project"]
    reqs = list(data.get("dependencies", []))
    for extra in extras:
        reqs += data.get("optional-dependencies", {}).get(extra, [])
    return reqs


def git_commit(repo: Path) -> str:
    """The checkout's commit, or where it came from when there is no .git (the device's copy):
    SELFCHECK_COMMIT when the command names it, else .whl/MANIFEST.txt's."""
    if os.environ.get("SELFCHECK_COMMIT"):
        return os.environ["SELFCHECK_COMMIT"] + " (SELFCHECK_COMMIT)"
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    manifest = Path(repo) / ".whl" / "MANIFEST.txt"
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            if line.startswith("commit "):
                return line.split(" ", 1)[1] + " (from .whl/MANIFEST.txt: no .git here)"
    return "unknown (no .git here)"


def mark_timed_out(path: Path, limit_s: float) -> None:
    """Called by the orchestrator when `timeout` stopped a stage: the record keeps what the stage
    had written, and says it was cut short. A temp file that write_json had not yet renamed (the
    stage killed mid-write) is removed: OUT holds exactly the 8 files the device tool brings back,
    and a ninth would leave one of them behind."""
    path = Path(path)
    for stray in path.parent.glob(path.name + ".tmp*"):
        stray.unlink(missing_ok=True)
    try:
        rec = read_json(path)
    except (OSError, ValueError):
        rec = {"stage": None, "name": path.stem, "checks": [], "skipped": []}
    rec["status"] = "timed_out"
    rec["seconds"] = limit_s
    rec.setdefault("checks", []).append({"check": f"stage finished within its {limit_s:g} s limit", "result": "FAIL",
                                         "detail": "stopped by timeout; the figures above are what it had measured"})
    write_json(path, rec)


# The device tool's terms (/work/.library/device/README.md): one command may run 600 s, of which the
# self-check leaves 90 s unused; a task's lease is 900 s of device time, the machine's start (a
# minute or more; 120 s assumed) included, and it must hold the run twice (one rerun on the warm
# machine). Setup (the wheel install and the first `import torch`, 20 s each at most), the grace
# before a stage's SIGKILL and the report written after each stage are bounded too.
CALL_S, KEEP_S, LEASE_S, START_S = 600, 90, 900, 120
SETUP_S, KILL_GRACE_S, REPORT_S = 40, 3, 3


def timing_plan(limits: list[float]) -> dict:
    """The worst case of one self-check run with these stage limits (seconds): setup, each stage's
    limit plus the grace before SIGKILL and its report, and the final report, against the call
    (CALL_S less KEEP_S) and the lease (START_S plus two runs).
    Returns {'worst_s', 'call_ok', 'lease_s', 'lease_ok', 'text'}."""
    worst = SETUP_S + sum(lim + KILL_GRACE_S + REPORT_S for lim in limits) + REPORT_S
    lease = START_S + 2 * worst
    text = (f"timing plan of the GPU run: setup {SETUP_S} + stages {' + '.join(f'{lim:g}' for lim in limits)} (+{KILL_GRACE_S} s "
            f"grace and a {REPORT_S} s report each) + report {REPORT_S} = worst {worst:g} s of a {CALL_S} s call "
            f"(leaves {CALL_S - worst:g} s, needs >= {KEEP_S}); lease: start {START_S} + 2 runs = {lease:g} of "
            f"{LEASE_S} s")
    return {"worst_s": worst, "call_ok": CALL_S - worst >= KEEP_S, "lease_s": lease, "lease_ok": lease <= LEASE_S,
            "text": text}


# The only variables a stage may hand to the later ones (stage 1's SDPA fallback).
STAGE_ENV_NAMES = ("TORCH_CUDNN_SDPA_DEPRIORITIZED",)


def stage_env(path: Path) -> str:
    """`export NAME=VALUE` lines for the shell, from a stage record's env_for_later_stages (names
    in STAGE_ENV_NAMES only, values quoted); '' when there is none or no record."""
    import shlex
    try:
        env = read_json(path).get("env_for_later_stages") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items() if k in STAGE_ENV_NAMES)


if __name__ == "__main__":  # python common.py timed-out FILE LIMIT | stage-env FILE (used by gpu_selfcheck.sh)
    if len(sys.argv) == 4 and sys.argv[1] == "timed-out":
        mark_timed_out(Path(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "stage-env":
        print(stage_env(Path(sys.argv[2])), end="")
    elif len(sys.argv) >= 3 and sys.argv[1] == "timing-plan":  # exits 1 when the limits break the plan
        plan = timing_plan([float(x) for x in sys.argv[2:]])
        print(plan["text"] + ("" if plan["call_ok"] and plan["lease_ok"] else "  <- OVER"))
        sys.exit(0 if plan["call_ok"] and plan["lease_ok"] else 1)
    else:
        sys.exit("usage: python scripts/selfcheck/common.py timed-out STAGE_JSON LIMIT_S | stage-env STAGE_JSON | "
                 "timing-plan LIMIT...")


def stage_args(work: bool = True) -> argparse.Namespace:
    """The command line every stage takes: OUT [WORK] [--dry-run] [--limit SECONDS]."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    if work:
        ap.add_argument("work", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--limit", type=float, default=None, help="the stage's time limit (s)")
    return ap.parse_args()
