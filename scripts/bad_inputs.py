"""The bad-input sweep: a table of inputs a user (or a hostile tester) can get wrong, each run
against the real CLI in a subprocess, with its own temporary AUTOFIT_HOME and working folder.

Every row must end in exactly one line on stderr, a non-zero exit and no traceback (and, where
a row says so, leave its files as they were). Rows whose fix belongs to another branch carry
`by=` (the branch or issue point) and, until that fix lands, sit in KNOWN_FAILURES: they are
reported apart and do not fail the sweep. A known failure that passes is reported too, so the
set can be trimmed as fixes merge.

    python scripts/bad_inputs.py            # the whole table; exit 1 if a row fails
    python scripts/bad_inputs.py -k profile # only rows whose name contains 'profile'
    BAD_INPUTS_JOBS=2 python scripts/bad_inputs.py

Rows are cheap: tiny models, the budgeted CPU device, `--max-steps 1`, checks that fail early.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
        "--set", "batch_size=8", "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1",
        "--set", "eval_interval=100"]
CPU = ["--device", "cpu", "--budget", "64MiB"]
RUN = ["run", *CPU, *TINY, "--max-steps", "1", "--no-progress"]
PROBE = ["probe", *CPU, *TINY, "--checkpointing", "0", "--loss", "standard"]
GTX = ["profiles", "add", "gtx1650-4gb", "--memory", "4GiB", "--compute-capability", "7.5",
       "--peak-fp16-tflops", "8.9", "--bandwidth-gbs", "192"]
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Row:
    name: str
    args: list[str]  # '{t}' is replaced by the row's temporary folder
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path], str] | None = None  # returns '' or what is wrong with the files left
    by: str = "hardening"  # who fixes it: this branch, or e.g. 'confdata', 'lead', 'issue 11'
    skip: str = ""  # a reason this row cannot run here
    env: dict[str, str] = field(default_factory=dict)
    stdout: str = ""  # 'full': stdout is /dev/full; 'closed': the command starts with fd 1 closed (`>&-`)
    ok: bool = False  # a valid input people really have: it must succeed (exit 0, no traceback)
    # timing-dependent by nature (a rank killed mid-run): one retry, the first attempt reported
    # beside it ("flaky"), so a rare race shows without blocking the sweep. The killed-rank row's
    # one race so far: torchrun's SIGTERM reached rank 0 before it saw its peer gone, and rank 0
    # said its stop notice beside the launcher's line (fixed: trainer.interrupt.reported_by_launcher)
    racy: bool = False


# ---------------------------------------------------------------- set-ups


def write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        path = t / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return make


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        for step in steps:
            step(t)
    return make


def read_only(rel: str) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        (t / rel).mkdir(parents=True, exist_ok=True)
        (t / rel).chmod(0o555)
    return make


def tokens(rel: str, ids: list[int], repeat: int, meta_vocab: int | None = None, shards: bool = False):
    """A nanoGPT data folder (train.bin/val.bin, uint16) or llm.c shards holding `ids` repeated."""
    def make(t: Path) -> None:
        folder = t / rel
        folder.mkdir(parents=True)
        body = struct.pack(f"<{len(ids)}H", *ids) * repeat
        if shards:  # llm.c: a 256 x int32 header (magic 20240520, version 1, token count), then uint16
            header = struct.pack("<256i", 20240520, 1, len(ids) * repeat, *([0] * 253))
            for split in ("train", "val"):
                (folder / f"data_{split}_000000.bin").write_bytes(header + body)
        else:
            for split in ("train", "val"):
                (folder / f"{split}.bin").write_bytes(body)
        if meta_vocab is not None:
            (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": meta_vocab}))
    return make


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def checkpoint(edit: Callable[[dict], object] | None = None, raw: bytes | None = None):
    """A real checkpoint from CHECKPOINT (made once), edited; or raw bytes as ckpt.pt."""
    def make(t: Path) -> None:
        (t / "o").mkdir()
        if raw is not None:
            (t / "o" / "ckpt.pt").write_bytes(raw)
            return
        shutil.copy(CHECKPOINT / "ckpt.pt", t / "o" / "ckpt.pt")
        if edit is not None:
            import torch
            ck = torch.load(t / "o" / "ckpt.pt", weights_only=True)
            edit(ck)
            torch.save(ck, t / "o" / "ckpt.pt")
    return make


def unchanged(rel: str, text: str) -> Callable[[Path], str]:
    return lambda t: "" if (t / rel).read_text() == text else f"{rel} was changed"


def absent(*rels: str) -> Callable[[Path], str]:
    return lambda t: ", ".join(f"{r} exists" for r in rels if (t / r).exists())


# A sitecustomize.py put on the row's PYTHONPATH: the disk says no, by injection (no tiny tmpfs
# here). BAD_INPUTS_FAIL_WRITE=ENOSPC:ckpt.pt makes fsync, and writes through open(), fail with
# ENOSPC for every file whose path holds 'ckpt.pt' ('*': every file), as a full disk does;
# ENOSPC:ckpt.pt:2 lets the first such file through (the disk fills up after it).
FAIL_WRITES = r'''
import builtins, errno, os
_code, _part, _nth = (os.environ.get("BAD_INPUTS_FAIL_WRITE", "").split(":") + ["", ""])[:3]
_seen = set()


def _hit(name):
    if _part != "*" and _part not in str(name):
        return False
    _seen.add(str(name))
    return len(_seen) >= int(_nth or 1)


def _fail(*args, **kwargs):
    number = getattr(errno, _code)
    raise OSError(number, os.strerror(number))


class _Failing:
    def __init__(self, f):
        self._f = f

    write = _fail

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


if _code:
    _fsync, _open = os.fsync, builtins.open

    def _named(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    def fsync(fd):
        return _fail() if _hit(_named(fd)) else _fsync(fd)

    _os_write = os.write

    def os_write(fd, data):  # an os-level append (trainer.writes.append_lines) fails as a file's write does
        return _fail() if fd > 2 and _hit(_named(fd)) else _os_write(fd, data)

    def open_(file, mode="r", *args, **kwargs):
        f = _open(file, mode, *args, **kwargs)
        named = isinstance(file, (str, bytes, os.PathLike)) and _hit(os.fsdecode(file))
        return _Failing(f) if named and any(c in mode for c in "wax+") else f

    os.fsync, os.write, builtins.open = fsync, os_write, open_

# BAD_INPUTS_KILL_RANK=1: that rank of a run kills itself (SIGKILL, as the kernel's OOM killer
# does) once rank 0 has logged a training step in o/metrics.jsonl.
if os.environ.get("BAD_INPUTS_KILL_RANK") and os.environ.get("RANK") == os.environ["BAD_INPUTS_KILL_RANK"]:
    import signal, threading, time

    def _kill_after_a_step():
        while '"type": "train"' not in (open("o/metrics.jsonl").read() if os.path.exists("o/metrics.jsonl") else ""):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_kill_after_a_step, daemon=True).start()

# BAD_INPUTS_SIGNAL=INT:train_000002.bin: once a file whose path holds 'train_000002.bin' is renamed
# into place (the last step of an atomic write: a dataset shard is then whole), the process sends
# itself SIGINT (TERM: SIGTERM), once, as a user's Ctrl-C or a scheduler's SIGTERM would.
if os.environ.get("BAD_INPUTS_SIGNAL"):
    import signal
    _sig, _at = os.environ["BAD_INPUTS_SIGNAL"].split(":", 1)
    _os_replace, _sent = os.replace, []

    def _replace(src, dst, *args, **kwargs):
        _os_replace(src, dst, *args, **kwargs)
        if _at in os.fsdecode(dst) and not _sent:
            _sent.append(1)
            os.kill(os.getpid(), getattr(signal, "SIG" + _sig))
    os.replace = _replace
'''

# inject/tiktoken.py: tiktoken's GPT-2 encoding is a download, which the sweep cannot make; its
# stand-in encodes bytes as token ids, so `data prepare fineweb-edu` rows run offline.
FAKE_TIKTOKEN = '''
class _Bytes:
    eot_token = 50256

    def encode_ordinary(self, text):
        return list(text.encode())


def get_encoding(name):
    return _Bytes()
'''


def with_path(env: dict[str, str]) -> dict[str, str]:
    """A row's environment with its PYTHONPATH ('inject') put before the caller's, not in its
    place: a sweep run from a working copy (PYTHONPATH=/tmp/clone) tested the installed autofit
    in every injecting row, not the copy's (k21, session 17)."""
    mine = os.environ.get("PYTHONPATH", "")
    if "PYTHONPATH" not in env or not mine:
        return env
    return {**env, "PYTHONPATH": env["PYTHONPATH"] + os.pathsep + mine}


def failing(spec: str) -> dict[str, str]:
    """The environment of a row whose writes fail as `spec` says ('ENOSPC:ckpt.pt'); its set-up
    must include inject()."""
    return {"PYTHONPATH": "inject", "BAD_INPUTS_FAIL_WRITE": spec}


def inject(t: Path) -> None:
    write("inject/sitecustomize.py", FAIL_WRITES)(t)


def nanogpt_checkpoint_on_more_vocab(t: Path) -> None:
    """o/ckpt.pt in nanoGPT's layout, trained on dataset 'd'; d then prepared again from another
    text whose meta.pkl declares 21 more token ids than the checkpoint's model holds."""
    import torch
    (t / "o").mkdir()
    ck = torch.load(CHECKPOINT / "ckpt.pt", weights_only=True)
    cfg, vocab = ck["config"], ck["config"]["vocab_size"]
    keys = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
    torch.save({"model": ck["model"], "optimizer": ck["optimizer"], "model_args": {k: cfg[k] for k in keys},
                "iter_num": ck["iter_num"], "best_val_loss": torch.tensor(1.0),
                "config": {"dataset": "d", "batch_size": cfg["batch_size"], "block_size": cfg["block_size"],
                           "gradient_accumulation_steps": cfg["gradient_accumulation_steps"], "max_iters": 100}},
               t / "o" / "ckpt.pt")
    tokens("d", list(range(vocab + 21)), 4, meta_vocab=vocab + 21)(t)


def checkpoint_kept(t: Path) -> str:
    """'' when o/ckpt.pt is the first checkpoint (step 1), whole, and no temp file is left."""
    import torch
    left = [p.name for p in (t / "o").iterdir() if p.name.startswith(".ckpt.pt")]
    step = torch.load(t / "o" / "ckpt.pt", weights_only=True)["iter_num"]
    return ", ".join(([] if step == 1 else [f"ckpt.pt is of step {step}"]) + [f"{n} left" for n in left])


CORRUPT = "this is = [not toml"
NEWER = 'schema_version = 99\nname = "cpu-64mb"\n'
PROFILE_64 = "home/profiles/cpu-64mb.toml"
CHECKPOINT: Path = Path()  # set in main(): a folder holding one real ckpt.pt

# ---------------------------------------------------------------- set-ups of issue 19, reading (bounds-read)


def link(rel: str, target: str) -> Callable[[Path], None]:
    """A symbolic link at `rel` to `target` (which may not exist, or be the link itself)."""
    def make(t: Path) -> None:
        (t / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target.replace("{t}", str(t)), t / rel)
    return make


def fifo(rel: str) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        (t / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(t / rel)
    return make


def put(**fields) -> Callable[[dict], None]:
    """A checkpoint edit: set top-level fields; a callable value is called with the checkpoint."""
    def edit(ck: dict) -> None:
        for k, v in fields.items():
            ck[k] = v(ck) if callable(v) else v
    return edit


def rng_of(size: int):
    def make(ck):
        import torch
        return torch.zeros(size, dtype=torch.uint8)
    return make


def nanogpt_only(**fields) -> Callable[[dict], None]:
    """The checkpoint reduced to nanoGPT's six keys (its layout), with `fields` set."""
    def edit(ck: dict) -> None:
        for k in [k for k in ck if k not in ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config")]:
            del ck[k]
        ck.update(fields)
    return edit


def weights_of_wrong_shape(ck: dict) -> None:
    import torch
    ck["model"]["transformer.wte.weight"] = torch.zeros(3, 3)


def moments_swapped(ck: dict) -> None:
    groups = ck["optimizer"]["param_groups"]
    groups[0]["params"] = list(reversed(groups[0]["params"]))


def sidecar_stale(rel: str, max_token: int) -> Callable[[Path], None]:
    """A .max.json beside each .bin of `rel` claiming `max_token`, with the file's own size and
    mtime (as `cp -p` of another dataset's files leaves it)."""
    def make(t: Path) -> None:
        import json
        for f in (t / rel).glob("*.bin"):
            st = f.stat()
            (t / rel / (f.name + ".max.json")).write_text(json.dumps(
                {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "max_token": max_token}))
    return make


def profile_with(hardware: str = 'kind = "cpu"\ngpu = "CPU (budgeted)"\nmemory_bytes = 67108864\n',
                 plan: str = "") -> str:
    """A cpu-64mb profile: a hardware table and, when given, one plan's [plan] table."""
    text = f'schema_version = 1\nname = "cpu-64mb"\n[hardware]\n{hardware}'
    if plan:
        text += ('[plans.abc]\nfingerprint = "abc"\ncreated = 2026-01-01T00:00:00Z\nupdated = 2026-01-01T00:00:00Z\n'
                 '[plans.abc.fingerprint_inputs]\nx = 1\n[plans.abc.config_summary]\nx = 1\n[plans.abc.plan]\n' + plan)
    return text


# two plans whose fingerprints share a prefix: `profiles rm --plan abcd` cannot tell which
TWO_PLANS = 'schema_version = 1\nname = "cpu-64mb"\n[hardware]\nkind = "cpu"\nmemory_bytes = 67108864\n' + "".join(
    f'[plans.{fp}]\nfingerprint = "{fp}"\ncreated = 2026-01-01T00:00:00Z\nupdated = 2026-01-01T00:00:00Z\n'
    f'[plans.{fp}.fingerprint_inputs]\nx = 1\n[plans.{fp}.config_summary]\nx = 1\n[plans.{fp}.plan]\n'
    'mode = "measured"\nmicro_batch = 8\ngrad_accum = 2\nmicro_batches = [8, 8]\neffective_batch = 16\n'
    'block_size = 32\ndtype = "float32"\ncompile = false\ncompile_after = 0\ncheckpointing = 0\n'
    'loss_impl = "standard"\nbudget_bytes = 67108864\nsplit = "16 = 2 × 8"\n' for fp in ("abcd12", "abcd34"))
ONE_PLAN = TWO_PLANS[:TWO_PLANS.index("[plans.abcd34]")]  # `--plan a` is unique here, and too short to trust
PLAN_MB0 = ('mode = "measured"\nmicro_batch = 0\ngrad_accum = 1\nmicro_batches = [0]\neffective_batch = 16\n'
            'block_size = 32\ndtype = "float32"\ncompile = false\ncompile_after = 0\ncheckpointing = 0\n'
            'loss_impl = "standard"\nbudget_bytes = 67108864\nsplit = "16 = 16 x 1"\n')
PLAN_JSON_MB0 = ('{"mode": "measured", "micro_batch": 0, "grad_accum": 1, "micro_batches": [16], "effective_batch": 16, '
                 '"block_size": 32, "dtype": "float32", "compile": false, "compile_after": 0, "checkpointing": 0, '
                 '"loss_impl": "standard", "budget_bytes": 67108864, "split": "16"}')
RESUME = ["run", "--resume", "--out", "o", "--no-progress", "--max-steps", "2"]
SAMPLE = ["sample", "--out", "o", "--num-samples", "1", "--max-new-tokens", "2"]


# ---------------------------------------------------------------- set-ups of issue 19, stopping at boundaries

FINEWEB = ["data", "prepare", "fineweb-edu", "--input", "rows.jsonl", "--shard-size", "64", "--out", "d", "--no-progress"]
PARTIAL = "d/.prepare-fineweb.partial"


def fineweb_rows(t: Path) -> None:
    """inject/ (signals, the tiktoken stand-in) and rows.jsonl: 40 documents, about 10 shards of 64 tokens."""
    inject(t)
    write("inject/tiktoken.py", FAKE_TIKTOKEN)(t)
    write("rows.jsonl", "".join('{"text": "%s%d"}\n' % ("doc " * (i % 3 + 1), i) for i in range(40)))(t)


def shards_kept(count: int) -> Callable[[Path], str]:
    """'' when the partial folder holds exactly shards 0..count-1 (whole: their llm.c headers
    match their sizes), their sidecars and progress.json, and d/ no shard under a final name."""
    def check(t: Path) -> str:
        part = t / PARTIAL
        if not part.is_dir():
            return f"{PARTIAL} is missing"
        want = {f"fineweb_{'val' if i == 0 else 'train'}_{i:06d}.bin" for i in range(count)}
        have = {p.name for p in part.iterdir()}
        problems = [f"{PARTIAL} holds {sorted(have)}"] if have != want | {n + ".max.json" for n in want} | {
            "progress.json"} else []
        for name in sorted(want & have):
            n = struct.unpack("<3i", (part / name).read_bytes()[:12])[2]
            if (part / name).stat().st_size != 1024 + 2 * n:
                problems.append(f"{name} is not whole")
        problems += [f"d/{p.name} exists" for p in (t / "d").glob("*.bin")]
        return ", ".join(problems)
    return check


def stopped_before(sig: str) -> Callable[[Path], None]:
    """fineweb_rows, then the row's command run once and stopped by `sig` after shard 2."""
    def make(t: Path) -> None:
        fineweb_rows(t)
        env = {**os.environ, "AUTOFIT_HOME": str(t / "home"), **with_path({"PYTHONPATH": "inject"}),
               "BAD_INPUTS_SIGNAL": f"{sig}:train_000002.bin"}
        proc = subprocess.run([sys.executable, "-m", "autofit.cli.app", *FINEWEB], cwd=t, env=env,
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        stopped = 128 + int(getattr(signal, "SIG" + sig))  # 130 SIGINT, 143 SIGTERM: the signal's own code
        if proc.returncode != stopped or not (t / PARTIAL / "progress.json").is_file():  # else the row proves nothing
            raise RuntimeError(f"the stopped run to continue was not stopped: exit {proc.returncode}, {proc.stderr[-300:]}")
    return make


def continued(t: Path) -> str:
    """'' when d/ holds the whole dataset (shards 0..n) and the partial folder is gone."""
    if (t / PARTIAL).exists():
        return f"{PARTIAL} is left"
    names = sorted(p.name for p in (t / "d").glob("*.bin"))
    return "" if len(names) >= 4 and "fineweb_val_000000.bin" in names else f"d/ holds {names}"


# ---------------------------------------------------------------- the table

ROWS: list[Row] = [
    # configs: files and keys
    Row("config file missing", ["config", "--config", "missing.py"]),
    Row("muon_lr with adamw", ["config", "--set", "muon_lr=0.01"], by="session 2026-12-04"),
    Row("config is a directory", ["config", "--config", "{t}"], by="confdata"),
    Row("config with a function call", ["config", "--config", "evil.py"], write("evil.py", "import os\nbatch_size = 4\n"),
        absent("pwned")),
    Row("config with os.system", ["config", "--config", "evil.py"],
        write("evil.py", '__import__("os").system("touch pwned")\n'), absent("pwned")),
    Row("config .py syntax error", ["config", "--config", "bad.py"], write("bad.py", "batch_size = = 4\n")),
    Row("config TOML syntax error", ["config", "--config", "bad.toml"], write("bad.toml", "batch_size = [\n")),
    Row("config binary garbage", ["config", "--config", "bad.toml"], write("bad.toml", b"\xff\xfe\x00\x81")),
    Row("config unknown extension", ["config", "--config", "c.yaml"], write("c.yaml", "batch_size: 4\n")),
    Row("config unknown key in file", ["config", "--config", "c.py"], write("c.py", "n_embed = 64\n")),
    Row("--set unknown key", ["config", "--set", "n_embed=3"]),
    Row("--set without =", ["config", "--set", "batch_size"]),
    Row("--set n_head not dividing n_embd", ["config", "--set", "n_head=5"]),
    Row("--set negative batch_size", ["config", "--set", "batch_size=-1"]),
    Row("--set zero block_size", ["config", "--set", "block_size=0"]),
    Row("--set dropout 1.0", ["config", "--set", "dropout=1.0"]),
    Row("--set dtype fp8", ["config", "--set", "dtype=fp8"]),
    Row("--set device tpu", ["config", "--set", "device=tpu"]),
    Row("--set huge integer", ["config", "--set", "max_iters=" + "9" * 400], by="confdata (bounded ints)"),
    Row("--set text for an int", ["config", "--set", "batch_size=lots"]),
    Row("--set init_from gpt3", ["config", "--set", "init_from=gpt3"]),
    # M1 (t5, session 14): GPT-2's weights replace these; a value written for them is refused, not dropped
    Row("gpt2 with --set n_layer", ["config", "--set", "init_from=gpt2", "--set", "n_layer=3"], by="session 14"),
    Row("gpt2 with a file's bias = False", ["config", "--config", "c.py"],
        write("c.py", "init_from = 'gpt2'\nbias = False\n"), by="session 14"),
    Row("gpt2 with block_size above 1024", ["config", "--set", "init_from=gpt2", "--set", "block_size=2048"],
        by="session 14"),
    Row("gpt2 with GPT-2's own values and a preset's shape", ["config", "--preset", "tiny", "--set", "init_from=gpt2",
                                                              "--set", "n_layer=12", "--set", "block_size=64"],
        ok=True, by="session 14"),
    Row("unknown preset", ["config", "--preset", "gpt5"]),
    # issue 11: non-finite numbers and quiet conversions
    Row("--set learning_rate=1e999", ["config", "--json", "--set", "learning_rate=1e999"], by="confdata"),
    Row("--set learning_rate=nan", ["config", "--json", "--set", "learning_rate=nan"], by="confdata"),
    Row("--set min_lr=-inf", ["config", "--json", "--set", "min_lr=-inf"], by="confdata"),
    Row(".py learning_rate = 1e999", ["config", "--json", "--config", "c.py"], write("c.py", "learning_rate = 1e999\n"),
        by="confdata"),
    Row(".py batch_size = True", ["config", "--config", "c.py"], write("c.py", "batch_size = True\n"), by="confdata"),
    Row(".py batch_size = 2.0", ["config", "--config", "c.py"], write("c.py", "batch_size = 2.0\n"), by="confdata"),
    Row("TOML batch_size = 2.0", ["config", "--config", "c.toml"], write("c.toml", "batch_size = 2.0\n"), by="confdata"),
    Row("--set batch_size=2.0", ["config", "--set", "batch_size=2.0"], by="confdata"),
    Row("--set compile=maybe", ["config", "--set", "compile=maybe"]),
    Row("non-finite loss in training", [*RUN, "--no-probe", "--set", "learning_rate=1e30", "--set", "grad_clip=0",
                                        "--max-steps", "4", "--out", "o"], by="lead (loop: stop on non-finite loss)"),
    # issue 11: levers, resume
    Row("--checkpointing 99 on a 1-layer model", [*PROBE[:-4], "--checkpointing", "99", "--json"],
        by="lead (levers checked before trials)"),
    Row("--resume changes the effective batch", ["run", "--resume", "--out", "o", "--no-progress", "--max-steps", "2",
                                                 "--set", "gradient_accumulation_steps=4"], checkpoint(),
        by="lead (resume refuses training changes)"),
    Row("--resume checkpoint lacks micro_batches", ["run", "--resume", "--out", "o", "--no-progress", "--max-steps", "2"],
        checkpoint(lambda ck: ck.pop("micro_batches")), by="lead (checkpoint keys checked)"),
    Row("--resume without a checkpoint", ["run", "--resume", "--out", "o", "--no-progress"]),
    Row("--checkpointing-policy selective with --checkpointing 0", [*PROBE, "--checkpointing-policy", "selective"],
        by="session 11"),
    Row("run --no-probe, checkpointing_policy selective with checkpointing 0 (t5 L5)",
        [*RUN, "--no-probe", "--set", "checkpointing_policy=selective", "--out", "o"], check=absent("o"), by="session 14"),
    Row("AUTOFIT_RANK_BUDGETS on one process, with --budget", [*RUN, "--out", "o"],
        env={"AUTOFIT_RANK_BUDGETS": "3MiB"}, check=absent("o"), by="session 11"),
    Row("AUTOFIT_RANK_BUDGETS on one process", ["run", "--device", "cpu", *TINY, "--max-steps", "1", "--no-progress",
                                                "--out", "o"], env={"AUTOFIT_RANK_BUDGETS": "3MiB"}, check=absent("o"),
        by="session 11"),
    Row("AUTOFIT_RANK_BUDGETS with --budget under --nproc-per-node 2", [*RUN, "--out", "o", "--nproc-per-node", "2"],
        env={"AUTOFIT_RANK_BUDGETS": "64MiB,64MiB"}, check=absent("o"), by="session 11"),
    Row("AUTOFIT_RANK_BUDGETS=3,2 (bare numbers: bytes) under --nproc-per-node 2",
        ["run", "--device", "cpu", *TINY, "--max-steps", "1", "--no-progress", "--out", "o", "--nproc-per-node", "2"],
        env={"AUTOFIT_RANK_BUDGETS": "3,2"}, check=absent("o"), by="session 18"),
    Row("AUTOFIT_RANK_BUDGETS=3MiB (one entry) under --nproc-per-node 2",
        ["run", "--device", "cpu", *TINY, "--max-steps", "1", "--no-progress", "--out", "o", "--nproc-per-node", "2"],
        env={"AUTOFIT_RANK_BUDGETS": "3MiB"}, check=absent("o"), by="session 18"),
    Row("AUTOFIT_RANK_BUDGETS past the machine's memory under --nproc-per-node 2",
        ["run", "--device", "cpu", *TINY, "--max-steps", "1", "--no-progress", "--out", "o", "--nproc-per-node", "2"],
        env={"AUTOFIT_RANK_BUDGETS": "64MiB,1024TiB"}, check=absent("o"), by="session 18"),
    Row("AUTOFIT_HOME relative (profiles would follow the cwd)", ["profiles", "list"], env={"AUTOFIT_HOME": "rel"},
        by="session 11"),
    Row("--resume with --set device=cuda (t5 M3)", ["run", "--resume", "--out", "o", "--no-progress", "--max-steps", "3",
                                                     "--set", "device=cuda"], checkpoint(), by="session 14"),
    Row("--resume with --set init_from=scratch", ["run", "--resume", "--out", "o", "--no-progress",
                                                   "--set", "init_from=scratch"], checkpoint(), by="session 11"),
    Row("--resume changes the model's shape", ["run", "--resume", "--out", "o", "--no-progress", "--allow-changes",
                                               "--set", "n_head=6"], checkpoint(), by="lead (resume shape)"),
    Row("--resume with an unknown --set key", ["run", "--resume", "--out", "o", "--no-progress", "--set", "n_layers=2"],
        checkpoint(), by="lead (resume shape)"),
    Row("--resume with a --set of the wrong type", ["run", "--resume", "--out", "o", "--no-progress",
                                                    "--set", "batch_size=abc"], checkpoint(), by="lead (resume shape)"),
    Row("--resume garbage checkpoint", ["run", "--resume", "--out", "o", "--no-progress"],
        checkpoint(raw=b"not a checkpoint")),
    Row("--resume malicious pickle", ["run", "--resume", "--out", "o", "--no-progress"],
        checkpoint(raw=pickle.dumps(_Evil())), absent("pwned"), by="lead (torch's pickle-protocol warning)"),
    Row("--resume plain-pickle checkpoint", ["run", "--resume", "--out", "o", "--no-progress"],
        checkpoint(raw=pickle.dumps({"model": {"w": 1}})), by="polish"),
    Row("sample from a malicious pickle", ["sample", "--out", "o", "--num-samples", "1", "--max-new-tokens", "2"],
        checkpoint(raw=pickle.dumps(_Evil())), absent("pwned"), by="polish"),
    Row("sample from a plain-pickle checkpoint", ["sample", "--out", "o", "--num-samples", "1"],
        checkpoint(raw=pickle.dumps({"model": {"w": 1}})), by="polish"),
    Row("fresh run onto an existing checkpoint", [*RUN, "--out", "o"], checkpoint()),
    # issue 11: data
    Row("token ids reach vocab_size (meta.pkl 65, ids to 199)", [*RUN, "--no-probe", "--set", "dataset={t}/d", "--set",
                                                                 "vocab_size=65", "--out", "o"],
        tokens("d", list(range(200)), 50, meta_vocab=65), by="confdata"),
    Row("probe: token ids reach vocab_size (meta.pkl 65, ids to 199)", [*PROBE, "--set", "dataset={t}/d", "--set",
                                                                        "vocab_size=65"],
        tokens("d", list(range(200)), 50, meta_vocab=65), by="t7 (session 15: probe --save stored a plan run refuses)"),
    Row("llm.c shards with ids >= vocab_size", [*RUN, "--no-probe", "--set", "dataset={t}/d", "--set", "vocab_size=50304",
                                                "--out", "o"], tokens("d", [1, 2, 60000, 3], 500, shards=True),
        by="confdata"),
    # session 18 (k24): a vocab uint16 files cannot hold; the built-in corpus's name taken by a dataset of yours
    Row("vocab_size 100277 on uint16 .bin files", [*RUN, "--no-probe", "--set", "dataset={t}/d", "--set",
                                                   "vocab_size=100277", "--out", "o"],
        tokens("d", list(range(200)), 50), absent("o"), by="k24"),
    Row("dataset='embedded' beside your own data/embedded", [*RUN, "--no-probe", "--set", "dataset=embedded", "--set",
                                                             "vocab_size=256", "--out", "o"],
        tokens("data/embedded", list(range(200)), 50), absent("o"), by="k24"),
    Row("val split shorter than block_size + 1", [*RUN, "--set", "dataset={t}/d", "--set", "vocab_size=50304",
                                                  "--out", "o"], tokens("d", list(range(20)), 1),
        by="lead (split length checked before trials; the check is confdata's)"),
    Row("--set block_size=200000 on the built-in corpus", [*RUN, "--set", "block_size=200000", "--out", "o"],
        by="lead (split length checked before trials; the check is confdata's)"),
    Row("dataset folder missing", [*RUN, "--set", "dataset={t}/nope", "--out", "o"]),
    Row("dataset is a file", [*RUN, "--set", "dataset={t}/f.bin", "--out", "o"], write("f.bin", b"\0\0")),
    Row("tensorboard_dir under a file", [*RUN, "--set", "tensorboard_dir={t}/f.bin/tb", "--out", "o"],
        write("f.bin", b"x"), by="lead (tensorboard_dir)"),
    Row("tensorboard_dir empty", [*RUN, "--set", "tensorboard_dir=", "--out", "o"], by="lead (tensorboard_dir)"),
    Row("dataset name not prepared", [*RUN, "--set", "dataset=shakespeare_char", "--out", "o"]),
    # issue 11: output folders
    Row("--out under a file", [*RUN, "--out", "{t}/file/o"], write("file", "x"), by="lead (output checked first)"),
    Row("--out read-only", [*RUN, "--out", "{t}/ro/o"], read_only("ro"), by="lead (output checked first)",
        skip="root ignores permission bits" if ROOT_USER else ""),
    # profiles (this branch)
    Row("probe --save onto a corrupt profile", [*PROBE, "--save", "--json"], write(PROFILE_64, CORRUPT),
        unchanged(PROFILE_64, CORRUPT)),
    Row("probe --save onto a newer-schema profile", [*PROBE, "--save", "--json"], write(PROFILE_64, NEWER),
        unchanged(PROFILE_64, NEWER)),
    Row("probe --save, profiles dir under a file", [*PROBE, "--save"], write("home", "x")),
    Row("probe --save, profiles dir read-only", [*PROBE, "--save"], read_only("home/profiles"),
        skip="root ignores permission bits" if ROOT_USER else ""),
    Row("profiles rm, profiles dir read-only", ["profiles", "rm", "cpu-64mb"],
        both(write(PROFILE_64, CORRUPT), lambda t: (t / "home/profiles").chmod(0o555)),
        skip="root ignores permission bits" if ROOT_USER else ""),
    Row("profiles rm nope writes nothing", ["profiles", "rm", "nope"], check=absent("home")),
    Row("profiles rm a built-in", ["profiles", "rm", "rtx4070-12gb"]),
    Row("profiles rm --plan unknown", ["profiles", "rm", "cpu-64mb", "--plan", "abc"], write(PROFILE_64, NEWER)),
    Row("profiles rm bad name", ["profiles", "rm", "../etc/passwd"]),
    Row("profiles show unknown", ["profiles", "show", "nope"]),
    Row("profiles show corrupt", ["profiles", "show", "cpu-64mb"], write(PROFILE_64, CORRUPT)),
    Row("profiles show newer schema", ["profiles", "show", "cpu-64mb"], write(PROFILE_64, NEWER)),
    Row("run --profile corrupt", ["run", "--profile", "cpu-64mb", *TINY, "--max-steps", "1", "--out", "o"],
        write(PROFILE_64, CORRUPT), unchanged(PROFILE_64, CORRUPT)),
    Row("profiles add bad compute capability", [*GTX[:6], "seven", *GTX[7:]]),
    Row("profiles add bf16 before Ampere", [*GTX, "--peak-bf16-tflops", "20"]),
    Row("profiles add negative TFLOP/s", [*GTX[:7], "--peak-fp16-tflops=-1", *GTX[9:]]),
    Row("profiles add bad memory", [*GTX[:3], "--memory", "lots", *GTX[5:]]),
    Row("profiles add bad name", ["profiles", "add", "my card", *GTX[3:]]),
    Row("profiles add name says another memory", [*GTX[:3], "--memory", "8GiB", *GTX[5:]], by="session 2026-12-04"),
    Row("profiles add 0gb name", ["profiles", "add", "x-0gb", *GTX[3:]], by="session 2026-12-04"),
    Row("profiles add 1e-300 TFLOP/s (every estimate 0 tokens/s)", [*GTX[:7], "--peak-fp16-tflops", "1e-300", *GTX[9:]],
        check=absent("home/profiles/gtx1650-4gb.toml"), by="session 11"),
    Row("profiles add 0.5 GB/s", [*GTX[:9], "--bandwidth-gbs", "0.5"], check=absent("home/profiles/gtx1650-4gb.toml"),
        by="session 11"),
    Row("profiles add a newline in --gpu", [*GTX, "--gpu", "GTX\n1650"], check=absent("home/profiles/gtx1650-4gb.toml"),
        by="session 11"),
    Row("profiles add a blank --gpu", [*GTX, "--gpu", " "], check=absent("home/profiles/gtx1650-4gb.toml"),
        by="session 11"),
    Row("profiles add compute capability 99.99", [*GTX[:5], "--compute-capability", "99.99", *GTX[7:]],
        check=absent("home/profiles/gtx1650-4gb.toml"), by="session 11"),
    Row("profiles rm --plan an ambiguous prefix", ["profiles", "rm", "cpu-64mb", "--plan", "abcd"],
        write(PROFILE_64, TWO_PLANS), unchanged(PROFILE_64, TWO_PLANS), by="session 11"),
    Row("profiles rm --plan a one-character prefix", ["profiles", "rm", "cpu-64mb", "--plan", "a"],
        write(PROFILE_64, ONE_PLAN), unchanged(PROFILE_64, ONE_PLAN), by="session 12"),
    Row("profiles rm --lessons of an unknown plan", ["profiles", "rm", "cpu-64mb", "--plan", "zzzz", "--lessons"],
        write(PROFILE_64, TWO_PLANS), unchanged(PROFILE_64, TWO_PLANS), by="session 14"),
    Row("profiles rm --lessons of a newer-schema profile", ["profiles", "rm", "cpu-64mb", "--lessons"],
        write(PROFILE_64, NEWER), unchanged(PROFILE_64, NEWER), by="session 14"),
    Row("profiles rm --lessons nope writes nothing", ["profiles", "rm", "nope", "--lessons"], check=absent("home"),
        by="session 14"),
    Row("probe --gpu a CPU profile", ["probe", "--gpu", "cpu-64mb"],
        write(PROFILE_64, 'schema_version = 1\nname = "cpu-64mb"\n[hardware]\nkind = "cpu"\n')),
    Row("probe --gpu an incomplete user GPU", ["probe", "--gpu", "gtx1650-4gb"],
        write("home/profiles/gtx1650-4gb.toml", 'name = "gtx1650-4gb"\n[hardware]\ngpu = "GTX 1650"\nkind = "cuda"\n')),
    # probe and run options
    Row("probe --gpu unknown", ["probe", "--gpu", "rtx4070-12gbb"]),
    Row("probe --gpu with --device", ["probe", "--gpu", "rtx4070-12gb", "--device", "cpu"]),
    Row("probe --save with --gpu", ["probe", "--gpu", "rtx4070-12gb", "--save"]),
    Row("probe --device tpu", ["probe", "--device", "tpu"]),
    Row("probe --device cuda without a GPU", ["probe", "--device", "cuda"],
        skip="" if shutil.which("nvidia-smi") is None else "a GPU is here"),
    Row("probe --budget lots", ["probe", "--device", "cpu", "--budget", "lots"]),
    Row("probe --budget 0", ["probe", "--device", "cpu", "--budget", "0"]),
    Row("probe --budget too small for anything", ["probe", "--device", "cpu", "--budget", "1KB", *TINY, "--json"]),
    Row("probe --margin 1.5", ["probe", "--margin", "1.5"]),
    Row("probe --margin nan", ["probe", "--margin", "nan"]),
    Row("probe --dtype fp8", [*PROBE, "--dtype", "fp8", "--json"]),
    Row("probe --loss fancy", ["probe", "--loss", "fancy"]),
    Row("probe --checkpointing -1", ["probe", "--checkpointing", "-1"]),
    Row("probe --checkpointing a,b", ["probe", "--checkpointing", "a,b"]),
    Row("probe --compile on the CPU device", [*PROBE, "--compile", "--json"]),
    Row("probe --plot x.jpg", ["probe", "--plot", "x.jpg"]),
    Row("probe --plot into a missing folder", ["probe", "--plot", "nope/x.png"]),
    Row("run --max-steps -1", ["run", "--max-steps", "-1"]),
    # polish: flags that were taken quietly
    Row("--preset with --config (config)", ["config", "--preset", "tiny", "--config", "c.toml"],
        write("c.toml", "n_layer = 1\n"), by="polish"),
    Row("--preset with --config (probe)", [*PROBE, "--preset", "tiny", "--config", "c.toml"],
        write("c.toml", "n_layer = 1\n"), by="polish"),
    Row("--preset with --config (run)", [*RUN, "--preset", "tiny", "--config", "c.toml", "--out", "o"],
        write("c.toml", "n_layer = 1\n"), absent("o"), by="polish"),
    Row("probe --device cpu --gpu-index 1", [*PROBE, "--gpu-index", "1"], by="polish"),
    Row("run --budget --gpu-index 1", [*RUN, "--gpu-index", "1", "--out", "o"], check=absent("o/ckpt.pt"), by="polish"),
    Row("run --nproc-per-node 2 --gpu-index 1", [*RUN, "--nproc-per-node", "2", "--gpu-index", "1", "--out", "o"],
        by="polish"),
    Row("--resume of a CPU run with --gpu-index", ["run", "--resume", "--out", "o", "--no-progress", "--gpu-index", "1"],
        checkpoint(), by="polish"),
    Row("--resume of an autofit run with another --budget", ["run", "--resume", "--out", "o", "--no-progress",
                                                              "--budget", "1MiB"], checkpoint(), by="k3 (t4 finding 6)"),
    Row("a rank-only config error under --nproc-per-node", [*RUN, "--nproc-per-node", "2", "--out", "o"],
        env={"AUTOFIT_RANK_BUDGETS": "3MiB", "OMP_NUM_THREADS": "1", "AUTOFIT_DIST_TIMEOUT": "60"}, by="polish"),
    Row("run --max-steps 0", [*RUN, "--max-steps", "0", "--out", "o"], check=absent("o"), by="polish"),
    Row("run --no-probe --max-steps 0", [*RUN, "--no-probe", "--max-steps", "0", "--out", "o"], check=absent("o"),
        by="polish"),
    Row("run with max_iters 0", [*RUN, "--set", "max_iters=0", "--out", "o"], check=absent("o"), by="polish"),
    Row("--resume of a finished run", ["run", "--resume", "--out", "o", "--no-progress", "--set", "max_iters=1"],
        checkpoint(), by="polish"),
    Row("run --emulate without --profile", ["run", "--emulate"]),
    Row("run --profile unknown", ["run", "--profile", "no-such-card"]),
    Row("run --profile of a GPU, none here", ["run", "--profile", "rtx4070-12gb"],
        skip="" if shutil.which("nvidia-smi") is None else "a GPU is here"),
    Row("run --budget with --profile", ["run", "--profile", "cpu-64mb", "--budget", "1GiB"]),
    Row("run --no-probe with --profile", ["run", "--no-probe", "--profile", "cpu-64mb"]),
    Row("unknown command", ["train"]),
    Row("unknown option", ["probe", "--frobnicate"]),
    Row("option without its value", ["probe", "--set"]),
    # qa: environment settings and data preparation
    Row("--out not UTF-8", [*RUN, "--out", "o\udcff"], by="session 9"),
    Row("WORLD_SIZE=abc, config", ["config"], env={"WORLD_SIZE": "abc"}, by="session 9"),
    Row("WORLD_SIZE=0, run", [*RUN, "--out", "o"], env={"WORLD_SIZE": "0"}, check=absent("o"), by="session 9"),
    Row("WORLD_SIZE=2 RANK=5, run", [*RUN, "--out", "o"], env={"WORLD_SIZE": "2", "RANK": "5"}, check=absent("o"),
        by="session 9"),
    Row("WORLD_SIZE=2 LOCAL_RANK=-1, config", ["config"], env={"WORLD_SIZE": "2", "LOCAL_RANK": "-1"},
        by="session 9"),
    Row("TORCH_LOGS=garbage (import torch itself fails)", [*RUN, "--out", "o"], env={"TORCH_LOGS": "garbage"},
        check=absent("o"), by="session 9"),
    Row("TORCH_LOGS=garbage, probe", PROBE, env={"TORCH_LOGS": "garbage"}, by="session 9"),
    Row("AUTOFIT_DIST_TIMEOUT=0.0001 (c10d rounds it to 0 ms)", [*RUN, "--out", "o", "--nproc-per-node", "2"],
        env={"AUTOFIT_DIST_TIMEOUT": "0.0001"}, check=absent("o"), by="session 9"),
    Row("AUTOFIT_FAULT_OOM_AT_STEP=1@5 on one rank (never fires)", [*RUN, "--out", "o"],
        env={"AUTOFIT_FAULT_OOM_AT_STEP": "1@5"}, check=absent("o"), by="session 10"),
    Row("AUTOFIT_FAULT_OOM_AT_STEP=1@2 under --nproc-per-node 2", [*RUN, "--out", "o", "--nproc-per-node", "2"],
        env={"AUTOFIT_FAULT_OOM_AT_STEP": "1@2"}, check=absent("o"), by="session 10"),
    Row("AUTOFIT_DIST_TIMEOUT=inf", [*RUN, "--out", "o"], env={"AUTOFIT_DIST_TIMEOUT": "inf"}, check=absent("o"), by="qa"),
    Row("AUTOFIT_DIST_TIMEOUT=nan", [*RUN, "--out", "o"], env={"AUTOFIT_DIST_TIMEOUT": "nan"}, check=absent("o"), by="qa"),
    Row("AUTOFIT_DIST_TIMEOUT=1e20", [*RUN, "--out", "o"], env={"AUTOFIT_DIST_TIMEOUT": "1e20"}, check=absent("o"),
        by="qa"),
    Row("--config names a folder", ["config", "--config", "config"], setup=lambda t: (t / "config").mkdir(), by="qa"),
    Row("data prepare: text too short, piped", ["data", "prepare", "shakespeare_char", "--input", "a.txt", "--out", "d"],
        setup=write("a.txt", "a"), check=absent("d"), by="qa"),
    # ---- issue 19, writing and phases (bounds-write)
    Row("ENOSPC while saving the second checkpoint", [*RUN, "--no-probe", "--out", "o", "--max-steps", "3", "--set",
                                                      "eval_interval=1", "--set", "always_save_checkpoint=true"],
        inject, checkpoint_kept, env=failing("ENOSPC:ckpt.pt:2")),
    Row("EIO while saving the first checkpoint", [*RUN, "--no-probe", "--out", "o"], inject, absent("o/ckpt.pt"),
        env=failing("EIO:ckpt.pt")),
    Row("a full disk on a fresh run", [*RUN, "--out", "o"], inject, absent("o"), env=failing("ENOSPC:*")),
    Row("EIO writing metrics.jsonl", [*RUN, "--no-probe", "--out", "o"], inject, absent("o/ckpt.pt"),
        env=failing("EIO:metrics.jsonl")),
    Row("EROFS saving a profile (probe --save)", [*PROBE, "--save", "--json"], inject, absent(PROFILE_64),
        env=failing("EROFS:cpu-64mb.toml")),
    Row("EACCES writing --plot", [*PROBE, "--plot", "p.png", "--json"], inject, absent("p.png"),
        env=failing("EACCES:p.png")),
    Row("ENOSPC in data prepare", ["data", "prepare", "shakespeare_char", "--input", "a.txt", "--out", "d"],
        both(inject, write("a.txt", "to be or not to be\n" * 500)), absent("d"), env=failing("ENOSPC:train.bin")),
    Row("a full disk in data prepare", ["data", "prepare", "shakespeare_char", "--input", "a.txt", "--out", "d"],
        both(inject, write("a.txt", "to be or not to be\n" * 500)), absent("d"), env=failing("ENOSPC:*")),
    Row("stdout is /dev/full (config)", ["config"], stdout="full"),
    Row("stdout is /dev/full (config --json)", ["config", "--json"], stdout="full"),
    Row("stdout is /dev/full (probe)", [*PROBE, "--json"], stdout="full"),
    Row("stdout is /dev/full (run)", [*RUN, "--no-probe", "--out", "o"], stdout="full"),
    Row("stdout is /dev/full (profiles show)", ["profiles", "show", "rtx4070-12gb"], stdout="full"),
    Row("stdout closed (config)", ["config"], stdout="closed"),
    Row("stdout closed (run)", [*RUN, "--out", "o"], check=absent("o"), stdout="closed"),
    Row("ENOSPC in profiles add", GTX, inject, absent("home/profiles/gtx1650-4gb.toml"),
        env=failing("ENOSPC:gtx1650-4gb.toml")),
    Row("nanoGPT checkpoint whose vocab the dataset's meta.pkl exceeds", ["run", "--resume", "--out", "o", *CPU,
                                                                          "--no-progress"],
        nanogpt_checkpoint_on_more_vocab),
    Row("run --profile of a GPU, none here, dataset not prepared", ["run", "--profile", "rtx4070-12gb", "--set",
                                                                    "dataset=shakespeare_char"],
        skip="" if shutil.which("nvidia-smi") is None else "a GPU is here"),
    Row("a rank killed in training (--nproc-per-node 2)", [*RUN[:-3], "--max-steps", "400", "--set", "max_iters=400",
                                                          "--set", "log_interval=1", "--no-probe", "--nproc-per-node", "2", "--out", "o"],
        inject, env={"PYTHONPATH": "inject", "BAD_INPUTS_KILL_RANK": "1", "OMP_NUM_THREADS": "1",
                     "AUTOFIT_DIST_TIMEOUT": "60"}, racy=True),
    Row("fresh run onto another run's metrics.jsonl", [*RUN, "--out", "o"], write("o/metrics.jsonl", '{"type": "run"}\n'),
        unchanged("o/metrics.jsonl", '{"type": "run"}\n')),
    # ---- issue 19, reading (bounds-read): every field read back typed (1), paths as they are (3),
    # no more than the machine has (4), inputs people really have (5). Names start '19r:' (-k 19r:).
    # 1. checkpoints, autofit's layout
    Row("19r: --resume weights n_layer 1, config says 2", RESUME, checkpoint(lambda ck: ck["config"].update(n_layer=2))),
    Row("19r: --resume iter_num = -5", RESUME, checkpoint(put(iter_num=-5))),
    Row("19r: --resume iter_num is text", RESUME, checkpoint(put(iter_num="5"))),
    Row("19r: --resume iter_num = 2.5", RESUME, checkpoint(put(iter_num=2.5))),
    Row("19r: --resume best_val_loss is text", RESUME, checkpoint(put(best_val_loss="low"))),
    Row("19r: --resume RNG state of the wrong size", RESUME, checkpoint(put(rng_cpu=rng_of(10)))),
    Row("19r: --resume RNG state not a tensor", RESUME, checkpoint(put(rng_cpu=[1, 2, 3]))),
    Row("19r: --resume micro_batches empty", RESUME, checkpoint(put(micro_batches=[]))),
    Row("19r: --resume micro_batches [0]", RESUME, checkpoint(put(micro_batches=[0]))),
    Row("19r: --resume config not a dict", RESUME, checkpoint(put(config="big"))),
    Row("19r: --resume config with a bad value", RESUME, checkpoint(lambda ck: ck["config"].update(batch_size=-3))),
    Row("19r: --resume weights of another shape", RESUME, checkpoint(weights_of_wrong_shape)),
    Row("19r: --resume optimizer state of one group", RESUME,
        checkpoint(lambda ck: ck["optimizer"].update(param_groups=ck["optimizer"]["param_groups"][:1]))),
    Row("19r: --resume optimizer moments in another order", RESUME, checkpoint(moments_swapped)),
    Row("19r: --resume optimizer state not a dict", RESUME, checkpoint(put(optimizer=[1]))),
    Row("19r: --resume plan not an object", RESUME, checkpoint(put(plan="[1, 2]"))),
    Row("19r: --resume plan not JSON", RESUME, checkpoint(put(plan="{micro_batch: 4"))),
    Row("19r: --resume plan with micro_batch 0", RESUME, checkpoint(put(plan=PLAN_JSON_MB0))),
    Row("19r: --resume sampler counter negative", RESUME,
        checkpoint(lambda ck: ck["sampler"].update(counters={"train": -1, "val": 0}))),
    Row("19r: --resume sampler not a dict", RESUME, checkpoint(put(eval_sampler=7))),
    Row("--resume sampler counters emptied by hand", RESUME, checkpoint(lambda ck: ck["sampler"].update(counters={})),
        by="session 14"),
    Row("19r: --resume device kind tpu", RESUME, checkpoint(put(device={"kind": "tpu"}))),
    Row("19r: --resume device budget -1", RESUME, checkpoint(put(device={"kind": "cpu-budgeted", "budget_bytes": -1}))),
    Row("19r: --resume world_size 0", RESUME, checkpoint(put(world_size=0))),
    Row("19r: --resume model not a dict", RESUME, checkpoint(put(model="weights"))),
    Row("--resume checkpoint of a newer autofit format, a sampler key unknown here", RESUME,
        checkpoint(lambda ck: (ck.update(autofit_format=99), ck["sampler"].update(shuffle="v2"))), by="session 14"),
    # every other reader of ckpt.pt says 'upgrade autofit' too (sample read its nanoGPT keys, silently)
    Row("sample from a checkpoint of a newer autofit format", SAMPLE,
        checkpoint(lambda ck: (ck.update(autofit_format=99), ck["sampler"].update(shuffle="v2"))), by="session 15"),
    Row("init_from=resume from a checkpoint of a newer autofit format", [*RUN, "--out", "o", "--set", "init_from=resume"],
        checkpoint(lambda ck: (ck.update(autofit_format=99), ck["sampler"].update(shuffle="v2"))), by="session 15"),
    Row("--resume --nproc-per-node 2 from a checkpoint of a newer autofit format", [*RESUME, "--nproc-per-node", "2"],
        checkpoint(lambda ck: (ck.update(autofit_format=99), ck["sampler"].update(shuffle="v2"))), by="session 15"),
    # 1. checkpoints, nanoGPT's layout
    Row("19r: --resume nanoGPT checkpoint iter_num = -5", RESUME, checkpoint(nanogpt_only(iter_num=-5))),
    Row("19r: --resume nanoGPT checkpoint best_val_loss text", RESUME, checkpoint(nanogpt_only(best_val_loss="x"))),
    Row("19r: --resume nanoGPT weights n_layer 1, model_args say 2", RESUME,
        checkpoint(lambda ck: (nanogpt_only()(ck), ck["model_args"].update(n_layer=2)))),
    Row("19r: sample nanoGPT checkpoint iter_num = -5", SAMPLE, checkpoint(nanogpt_only(iter_num=-5))),
    Row("19r: sample checkpoint weights n_layer 1, config says 2", SAMPLE,
        checkpoint(lambda ck: (ck["config"].update(n_layer=2), ck["model_args"].update(n_layer=2)))),
    # 1. saved plans and hardware profiles
    Row("19r: profiles show, a plan with micro_batch 0", ["profiles", "show", "cpu-64mb"],
        write(PROFILE_64, profile_with(plan=PLAN_MB0))),
    Row("19r: run --profile, a plan with micro_batch 0", ["run", "--profile", "cpu-64mb", *TINY, "--max-steps", "1",
                                                         "--out", "o"], write(PROFILE_64, profile_with(plan=PLAN_MB0)),
        absent("o")),
    Row("19r: run --profile, memory_bytes = 10**30", ["run", "--profile", "cpu-64mb", *TINY, "--max-steps", "1",
                                                     "--out", "o"],
        write(PROFILE_64, profile_with('kind = "cpu"\nmemory_bytes = ' + "1" + "0" * 30 + "\n")), absent("o")),
    Row("19r: run --profile, memory_bytes = 0", ["run", "--profile", "cpu-64mb", *TINY, "--out", "o"],
        write(PROFILE_64, profile_with('kind = "cpu"\nmemory_bytes = 0\n')), absent("o")),
    Row("run --profile, memory_bytes = 1 (nothing left after the margin)", ["run", "--profile", "cpu-64mb", *TINY,
                                                                           "--out", "o"],
        write(PROFILE_64, profile_with('kind = "cpu"\nmemory_bytes = 1\n')), absent("o"), by="session 9"),
    Row("probe --budget 1", ["probe", "--device", "cpu", "--budget", "1", *TINY], by="session 9"),
    Row("run --profile, a CPU profile without a [hardware] table", ["run", "--profile", "cpu-64mb", *TINY, "--out", "o"],
        write(PROFILE_64, 'schema_version = 1\nname = "cpu-64mb"\n'), absent("o"), by="session 9"),
    Row("19r: run --profile, memory_bytes is text", ["run", "--profile", "cpu-64mb", *TINY, "--out", "o"],
        write(PROFILE_64, profile_with('kind = "cpu"\nmemory_bytes = "lots"\n')), absent("o")),
    Row("19r: profiles show, compute_capability empty", ["profiles", "show", "cpu-64mb"],
        write(PROFILE_64, profile_with('kind = "cuda"\ngpu = "X"\nmemory_bytes = 4096\ncompute_capability = []\n'))),
    Row("19r: profiles show, plans is a list", ["profiles", "show", "cpu-64mb"],
        write(PROFILE_64, 'schema_version = 1\nname = "cpu-64mb"\nplans = [1, 2]\n')),
    Row("19r: probe --gpu, user profile with negative bandwidth", ["probe", "--gpu", "gtx1650-4gb"],
        write("home/profiles/gtx1650-4gb.toml", profile_with(
            'kind = "cuda"\ngpu = "GTX 1650"\nmemory_bytes = 4294967296\ncompute_capability = [7, 5]\nbf16 = false\n'
            'peak_fp16_tflops = 8.9\nmemory_bandwidth_gbs = -192\n').replace("cpu-64mb", "gtx1650-4gb"))),
    # 3. paths as they really are
    Row("19r: --out a dangling symlink", [*RUN, "--out", "o"], link("o", "nowhere"), absent("nowhere")),
    Row("19r: --out a symlink loop", [*RUN, "--out", "o"], link("o", "o")),
    Row("19r: --out a symlink to a file", [*RUN, "--out", "o"], both(write("f", "x"), link("o", "f")),
        unchanged("f", "x")),
    Row("19r: --out a FIFO", [*RUN, "--out", "o"], fifo("o")),
    Row("19r: --out /dev/null", [*RUN, "--out", "/dev/null"]),
    Row("19r: --out under /proc (root's os.access says yes)", [*RUN, "--out", "/proc/autofit-out"]),
    Row("19r: probe --save, profiles dir a dangling symlink", [*PROBE, "--save"], link("home/profiles", "nowhere")),
    Row("19r: probe --save, profiles dir a symlink loop", [*PROBE, "--save"], link("home/profiles", "profiles")),
    Row("19r: probe --save, profiles dir a FIFO", [*PROBE, "--save"], fifo("home/profiles")),
    Row("19r: profiles show, profile file a FIFO", ["profiles", "show", "cpu-64mb"], fifo(PROFILE_64)),
    Row("19r: profiles show, profile file a symlink loop", ["profiles", "show", "cpu-64mb"],
        link(PROFILE_64, "cpu-64mb.toml")),
    Row("19r: --resume with a FIFO ckpt.pt", RESUME, both(lambda t: (t / "o").mkdir(), fifo("o/ckpt.pt"))),
    Row("19r: --resume ckpt.pt a dangling symlink", RESUME, both(lambda t: (t / "o").mkdir(), link("o/ckpt.pt", "x"))),
    Row("19r: --resume ckpt.pt a symlink loop", RESUME, both(lambda t: (t / "o").mkdir(), link("o/ckpt.pt", "ckpt.pt"))),
    Row("19r: --resume ckpt.pt is /dev/zero", RESUME, both(lambda t: (t / "o").mkdir(), link("o/ckpt.pt", "/dev/zero"))),
    Row("19r: sample from a FIFO ckpt.pt", SAMPLE, both(lambda t: (t / "o").mkdir(), fifo("o/ckpt.pt"))),
    Row("19r: --config a FIFO", ["config", "--config", "c.toml"], fifo("c.toml")),
    Row("19r: --config a dangling symlink", ["config", "--config", "c.toml"], link("c.toml", "nowhere.toml")),
    Row("19r: --config a symlink loop", ["config", "--config", "c.toml"], link("c.toml", "c.toml")),
    Row("19r: --config a symlink to /dev/zero", ["config", "--config", "c.py"], link("c.py", "/dev/zero")),
    Row("19r: sample --start FILE:/dev/zero", [*SAMPLE, "--start", "FILE:/dev/zero"], checkpoint()),
    Row("19r: sample --start FILE: a FIFO", [*SAMPLE, "--start", "FILE:{t}/p"], both(checkpoint(), fifo("p"))),
    Row("19r: sample --start FILE: a folder", [*SAMPLE, "--start", "FILE:{t}"], checkpoint()),
    Row("19r: dataset train.bin a FIFO", [*RUN, "--no-probe", "--set", "dataset={t}/d", "--out", "o"],
        both(tokens("d", list(range(20)), 50), lambda t: (t / "d/train.bin").unlink(), fifo("d/train.bin"))),
    Row("19r: dataset folder a symlink loop", [*RUN, "--no-probe", "--set", "dataset={t}/d", "--out", "o"],
        link("d", "d")),
    Row("19r: data prepare --input /dev/zero", ["data", "prepare", "shakespeare_char", "--input", "/dev/zero",
                                               "--out", "d"], check=absent("d")),
    Row("19r: data prepare --input a FIFO", ["data", "prepare", "shakespeare_char", "--input", "p", "--out", "d"],
        fifo("p"), absent("d")),
    Row("19r: data prepare --out a dangling symlink", ["data", "prepare", "shakespeare_char", "--input", "a.txt",
                                                      "--out", "d"], both(write("a.txt", "hello world " * 500),
                                                                          link("d", "nowhere")), absent("nowhere")),
    # 4. never ask for more than the machine has
    Row("19r: probe --budget 1000TiB, above the machine's memory", ["probe", "--device", "cpu", "--budget", "1000TiB",
                                                                   *TINY]),
    Row("19r: run --budget 1000TiB, above the machine's memory", [*RUN[:4], "1000TiB", *RUN[5:], "--out", "o"],
        check=absent("o")),
    Row("19r: gradient_accumulation_steps=1000000 probes (the step batch is never whole)",
        [*PROBE, "--set", "gradient_accumulation_steps=1000000", "--json"], ok=True),
    Row("19r: run --nproc-per-node 100000", [*RUN, "--nproc-per-node", "100000", "--set", "batch_size=100000",
                                             "--set", "gradient_accumulation_steps=1", "--out", "o"], check=absent("o")),
    # 5. inputs people really have
    Row("19r: TOML config with a UTF-8 BOM", ["config", "--config", "c.toml"], write("c.toml", b"\xef\xbb\xbfn_layer = 2\n"),
        ok=True),
    Row("19r: .py config with a UTF-8 BOM", ["config", "--config", "c.py"], write("c.py", b"\xef\xbb\xbfn_layer = 2\n"),
        ok=True),
    Row("19r: profile TOML with a UTF-8 BOM", ["profiles", "show", "cpu-64mb"],
        write(PROFILE_64, b"\xef\xbb\xbf" + profile_with().encode()), ok=True),
    Row("19r: dataset without meta.pkl, ids fit vocab_size", [*RUN, "--no-probe", "--set", "dataset={t}/d",
                                                             "--set", "vocab_size=200", "--out", "o"],
        tokens("d", list(range(200)), 5), ok=True),
    Row("19r: dataset without meta.pkl, ids reach vocab_size", [*RUN, "--no-probe", "--set", "dataset={t}/d",
                                                               "--set", "vocab_size=100", "--out", "o"],
        tokens("d", list(range(200)), 5), absent("o/ckpt.pt")),
    Row("19r: deeply nested TOML config", ["config", "--config", "c.toml"], write("c.toml", "a = " + "[" * 20000)),
    Row("19r: deeply nested TOML profile", ["profiles", "show", "cpu-64mb"],
        write(PROFILE_64, profile_with() + "x = " + "[" * 20000 + "]" * 20000 + "\n")),
    Row("19r: TOML config with 40,000 keys", ["config", "--config", "c.toml"],
        write("c.toml", "".join(f"key{i} = {i}\n" for i in range(40000)))),
    Row("19r: stale .max.json sidecar (same size and mtime)", [*RUN, "--no-probe", "--set", "dataset={t}/d",
                                                              "--set", "vocab_size=65", "--out", "o"],
        both(tokens("d", list(range(200)), 50, meta_vocab=65), sidecar_stale("d", 10)), absent("o/ckpt.pt")),
    Row("19r: LC_ALL=C PYTHONIOENCODING=ascii prints the plan", [*PROBE], ok=True,
        env={"LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "ascii"}),
    Row("19r: LC_ALL=C PYTHONIOENCODING=ascii config", ["config"], ok=True,
        env={"LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "ascii"}),
    Row("19r: sample --temperature inf", [*SAMPLE, "--temperature", "inf"], checkpoint()),
    Row("19r: sample --temperature nan", [*SAMPLE, "--temperature", "nan"], checkpoint()),
    Row("19r: sample --temperature 1e-300", [*SAMPLE, "--temperature", "1e-300"], checkpoint()),
    Row("19r: sample --seed -1", [*SAMPLE, "--seed", "-1"], checkpoint()),
    Row("19r: sample --seed 2**70", [*SAMPLE, "--seed", str(2**70)], checkpoint()),
    # ---- issue 19, 7: data preparation stops at a boundary, keeps its finished shards, and continues
    Row("19: SIGINT in data prepare fineweb-edu after shard 2", FINEWEB, fineweb_rows, shards_kept(3),
        env={"PYTHONPATH": "inject", "BAD_INPUTS_SIGNAL": "INT:train_000002.bin"}),
    Row("19: SIGTERM in data prepare fineweb-edu after shard 2", FINEWEB, fineweb_rows, shards_kept(3),
        env={"PYTHONPATH": "inject", "BAD_INPUTS_SIGNAL": "TERM:train_000002.bin"}),
    Row("19: data prepare fineweb-edu run again after a SIGTERM continues", FINEWEB, stopped_before("TERM"), continued,
        env={"PYTHONPATH": "inject"}, ok=True),
    # ---- issue 15: the probe's trial records, appended as each trial ends (AUTOFIT_TRIALS_JSONL)
    Row("15: AUTOFIT_TRIALS_JSONL under a file", [*PROBE, "--json"], write("f", "x"), unchanged("f", "x"),
        env={"AUTOFIT_TRIALS_JSONL": "f/trials.jsonl"}),
    # issue 16: a schedule of stages (trainer/config/stages.py)
    Row("stages: tokens not whole sequences (--set)",
        ["config", "--set", "block_size=32", "--set", "stages=[dict(block_size=32, tokens_per_step=100)]"], by="stages"),
    Row("stages: a middle stage without until_iter (TOML)", ["config", "--config", "c.toml"],
        write("c.toml", "block_size = 32\nstages = [{block_size = 16, tokens_per_step = 64}, "
                        "{block_size = 32, tokens_per_step = 64}]\n"), by="stages"),
    Row("stages: a call in a .py stage list", ["config", "--config", "c.py"],
        write("c.py", "stages = [dict(block_size=32, tokens_per_step=64), int('3')]\n"), by="stages"),
    Row("stages: largest block_size above the model's", ["config", "--set", "block_size=32",
                                                         "--set", "stages=[dict(block_size=64, tokens_per_step=64)]"],
        by="stages"),
    Row("stages: a stage's batch not dividing among the ranks", [*RUN, "--nproc-per-node", "3", "--set",
                                                               "stages=[dict(block_size=32, tokens_per_step=128)]",
                                                               "--out", "o"], check=absent("o"), by="stages"),
    Row("stages: a valid staged run trains", [*RUN[:-3], "--max-steps", "3", "--no-progress", "--no-probe", "--set",
                                             "stages=[dict(until_iter=2, block_size=16, tokens_per_step=256), "
                                             "dict(block_size=32, tokens_per_step=512)]", "--out", "o"],
        ok=True, by="stages"),
    # session 17, t11's findings
    Row("data prepare --force: a 2-character text over a dataset", ["data", "prepare", "shakespeare_char", "--input",
                                                                    "a.txt", "--out", "d", "--force", "--no-progress"],
        both(write("a.txt", "a\n"), write("d/train.bin", "abcd"), write("d/val.bin", "abcd")),
        lambda t: unchanged("d/train.bin", "abcd")(t) or unchanged("d/val.bin", "abcd")(t), by="session 17 (t11 M2)"),
    Row("data prepare fineweb-edu --max-tokens 1 past the val shard", [*FINEWEB, "--max-tokens", "65"], fineweb_rows,
        absent("d"), env={"PYTHONPATH": "inject"}, by="session 17 (t11 M2)"),
    Row("run --budget 2 (no unit: 2 bytes)", [*RUN[:4], "2", *RUN[5:], "--out", "o"], check=absent("o"),
        by="session 17 (t11 L5)"),
    Row("profiles add --memory 4 (no unit)", [*GTX[:4], "4", *GTX[5:]], check=absent("home/profiles/gtx1650-4gb.toml"),
        by="session 17 (t11 L5)"),
    Row("--set backend=foo (no torch.distributed backend)", [*RUN, "--set", "backend=foo", "--out", "o"],
        check=absent("o"), by="session 17 (t11 L6)"),
]

# Rows whose fix is on another branch and has not landed here yet. Flip them as fixes merge.
KNOWN_FAILURES: set[str] = set()


@dataclass
class Result:
    row: Row
    code: int | None
    last: str
    problems: list[str]
    seconds: float = 0.0  # wall time of the subprocess, printed only (load on the machine varies)
    stderr: str = ""  # kept for the report of a failing row
    first_try: "Result | None" = None  # a racy row's failed first attempt, when its retry passed


def run_row(row: Row, python: str, timeout: float) -> Result:
    if row.skip:
        return Result(row, None, f"skipped: {row.skip}", [])
    with tempfile.TemporaryDirectory(prefix="bad-input-") as tmp:
        t = Path(tmp)
        if row.setup is not None:
            row.setup(t)
        # the caller's fault injection never leaks into a row; a row's own does
        inherited = {k: v for k, v in os.environ.items() if k != "AUTOFIT_FAULT_OOM_AT_STEP"}
        env = {**inherited, "AUTOFIT_HOME": str(t / "home"), "COLUMNS": "200", **with_path(row.env)}
        args = [a.replace("{t}", str(t)) for a in row.args]
        start = time.monotonic()
        out = open("/dev/full", "w") if row.stdout == "full" else subprocess.PIPE  # noqa: SIM115
        try:
            proc = subprocess.run([python, "-m", "autofit.cli.app", *args], cwd=t, env=env, stdout=out,
                                  stderr=subprocess.PIPE, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                  preexec_fn=(lambda: os.close(1)) if row.stdout == "closed" else None)
        except subprocess.TimeoutExpired:
            return Result(row, None, f"timed out after {timeout:.0f} s", [f"timed out after {timeout:.0f} s"])
        finally:
            if out is not subprocess.PIPE:
                out.close()
            for folder in (t / "home" / "profiles", t / "ro", t / "home"):  # let the temp dir be removed
                if folder.is_dir():
                    folder.chmod(0o755)
        lines = proc.stderr.strip().splitlines()
        if row.ok:  # must be accepted: exit 0 and no traceback; what it says on stderr is its own
            problems = [f"exit {proc.returncode}"] if proc.returncode != 0 else []
        else:  # must be refused: a non-zero exit and exactly one line on stderr
            problems = (["exit 0"] if proc.returncode == 0 else []) + \
                ([f"{len(lines)} lines on stderr"] if len(lines) != 1 else [])
        if "Traceback" in proc.stderr or "Traceback" in (proc.stdout or ""):
            problems.append("traceback")
        if row.check is not None and (bad := row.check(t)):
            problems.append(bad)
        return Result(row, proc.returncode, lines[-1] if lines else "(no stderr)", problems,
                      time.monotonic() - start, proc.stderr if problems else "")


def run_row_once_more_if_racy(row: Row, python: str, timeout: float) -> Result:
    r = run_row(row, python, timeout)
    if r.problems and row.racy:
        again = run_row(row, python, timeout)
        again.first_try = r
        return again
    return r


def make_checkpoint(folder: Path, python: str) -> None:
    """One real one-step run, whose ckpt.pt the resume rows copy."""
    env = {**os.environ, "AUTOFIT_HOME": str(folder / "home")}
    proc = subprocess.run([python, "-m", "autofit.cli.app", *RUN, "--no-probe", "--out", str(folder)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not (folder / "ckpt.pt").is_file():
        sys.exit(f"bad_inputs: could not make the checkpoint the resume rows need: {proc.stderr.strip()[-300:]}")


def main(argv: list[str] | None = None) -> int:
    global CHECKPOINT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only rows whose name contains this")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that has autofit installed")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per row")
    args = ap.parse_args(argv)
    unknown = KNOWN_FAILURES - {r.name for r in ROWS}
    if unknown:
        print(f"bad_inputs: KNOWN_FAILURES names no row: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 1
    rows = [r for r in ROWS if args.k.lower() in r.name.lower()]
    with tempfile.TemporaryDirectory(prefix="bad-inputs-ckpt-") as ck:
        CHECKPOINT = Path(ck)
        if any(r.setup is not None and "checkpoint" in getattr(r.setup, "__qualname__", "") for r in rows):
            make_checkpoint(CHECKPOINT, args.python)
        jobs = int(os.environ.get("BAD_INPUTS_JOBS", "4"))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda r: run_row_once_more_if_racy(r, args.python, args.timeout), rows))
    return report(results)


def _mark(r: Result) -> str:
    if r.code is None and not r.problems:
        return "skip"
    if not r.problems:
        return "ok"
    return "known" if r.row.name in KNOWN_FAILURES else "FAIL"


def report(results: list[Result]) -> int:
    """Print one line per row and a summary; 1 if a row failed that is not a known failure."""
    if not results:
        print("no row matches")
        return 1
    width = max(len(r.row.name) for r in results)
    for r in results:
        code = "-" if r.code is None else str(r.code)
        by = f" [fixed-by:{r.row.by}]" if r.row.by != "hardening" else ""
        why = f"  <- {'; '.join(r.problems)}" if r.problems else ""
        print(f"{_mark(r):<5} {r.row.name:<{width}}  exit {code:>3} {r.seconds:5.1f}s  {r.last[:150]}{by}{why}")
    marks = [_mark(r) for r in results]
    failed = [r for r, m in zip(results, marks) if m == "FAIL"]
    known = [r for r, m in zip(results, marks) if m == "known"]
    fixed = [r for r, m in zip(results, marks) if m == "ok" and r.row.name in KNOWN_FAILURES]
    print(f"\n{len(results)} rows: {marks.count('ok')} ok, {len(failed)} failing, {len(known)} known failures "
          f"(fixes on other branches), {marks.count('skip')} skipped")
    for r in known:
        print(f"  known failure: {r.row.name} [fixed-by:{r.row.by}]: {'; '.join(r.problems)}")
    for r in fixed:
        print(f"  now passing, remove from KNOWN_FAILURES: {r.row.name}")
    for r in [r for r in results if r.first_try is not None and not r.problems]:
        print(f"  flaky (passed on its retry): {r.row.name}: first try {'; '.join(r.first_try.problems)}; its stderr:")
        print("    " + "\n    ".join(r.first_try.stderr.strip().splitlines()[-6:]))
    for r in failed:
        print(f"  FAILING: {r.row.name}: {'; '.join(r.problems)}; its stderr:")
        print("    " + "\n    ".join(r.stderr.strip().splitlines()[-6:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
