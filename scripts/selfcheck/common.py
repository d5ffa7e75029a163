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
from typing import Any

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
            timeout: float | None = None) -> dict:
    """Runs `python -m autofit.cli.app ARGS` with this interpreter. Its stderr (and its stdout, unless
    `echo_stdout` is False, as for --json) is copied to ours as it comes, so the self-check log
    holds what a run printed before a time-out. Past `timeout` seconds the command gets SIGTERM
    (autofit then finishes its step and saves a checkpoint), SIGKILL 20 s later; the caller
    still reads whatever it wrote. Returns {cmd, rc, stdout, stderr_tail, seconds, timed_out}."""
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
        rc = proc.wait(timeout=timeout)
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
    return {"cmd": "autofit " + " ".join(args), "rc": rc, "stdout": "".join(out_lines), "timed_out": timed_out,
            "stderr_tail": tail("".join(err_lines)), "seconds": round(time.monotonic() - t0, 1)}


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
    """The checkout's commit, or where it came from when there is no .git (the device's copy)."""
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
    had written, and says it was cut short."""
    path = Path(path)
    try:
        rec = read_json(path)
    except (OSError, ValueError):
        rec = {"stage": None, "name": path.stem, "checks": [], "skipped": []}
    rec["status"] = "timed_out"
    rec["seconds"] = limit_s
    rec.setdefault("checks", []).append({"check": f"stage finished within its {limit_s:g} s limit", "result": "FAIL",
                                         "detail": "stopped by timeout; the figures above are what it had measured"})
    write_json(path, rec)


if __name__ == "__main__":  # python common.py timed-out FILE LIMIT (used by gpu_selfcheck.sh)
    if len(sys.argv) == 4 and sys.argv[1] == "timed-out":
        mark_timed_out(Path(sys.argv[2]), float(sys.argv[3]))
    else:
        sys.exit("usage: python scripts/selfcheck/common.py timed-out STAGE_JSON LIMIT_S")


def stage_args(work: bool = True) -> argparse.Namespace:
    """The command line every stage takes: OUT [WORK] [--dry-run] [--limit SECONDS]."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    if work:
        ap.add_argument("work", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--limit", type=float, default=None, help="the stage's time limit (s)")
    return ap.parse_args()
