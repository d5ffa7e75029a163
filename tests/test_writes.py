"""trainer/writes.py: every write goes one way, and a refusal of the disk (ENOSPC, EIO, EROFS,
EACCES, a full or closed stdout) is one line saying what was written and what is kept. Faults are
injected (monkeypatched os.fsync / open): no tiny file system is at hand here."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cli_run import cli
from trainer import writes
from trainer.config.train_config import load_config
from trainer.errors import TrainError
from trainer.loop import RunOptions, train
from trainer.writes import GuardedStream, WriteError, append_lines, atomic_write, check_room

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
         "--set", "batch_size=8", "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1",
         "--set", "eval_interval=100"]


def fail_fsync(monkeypatch, code: int, part: str, after: int = 0) -> None:
    """os.fsync raises OSError(code) for files whose path holds `part`, after `after` such calls."""
    real, seen = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if part in name:
            seen.append(name)
            if len(seen) > after:
                raise OSError(code, os.strerror(code))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_refused_atomic_write_is_one_line_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))
    fail_fsync(monkeypatch, errno.ENOSPC, "f.bin")
    with pytest.raises(WriteError) as e:
        atomic_write(path, lambda f: f.write(b"new"), what="the thing", kept="f.bin is as it was")
    assert str(e.value) == "cannot write the thing: No space left on device [ENOSPC]; f.bin is as it was"
    assert isinstance(e.value, OSError) and isinstance(e.value, TrainError)  # old handlers still catch it
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_check_room_writes_bytes_so_a_full_disk_is_found(tmp_path, monkeypatch):
    check_room(tmp_path, "in --out x")
    fail_fsync(monkeypatch, errno.ENOSPC, str(tmp_path))  # a 0-byte file would still have been made
    with pytest.raises(WriteError, match=r"^cannot write in --out x: No space left on device \[ENOSPC\]"):
        check_room(tmp_path, "in --out x")
    assert list(tmp_path.iterdir()) == []


def test_an_append_after_a_cut_line_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"b": ')  # a crash (or a full disk) cut the last record short
    append_lines(path, ['{"c": 3}'])
    assert path.read_text().splitlines() == ['{"a": 1}', '{"b": ', '{"c": 3}']


def test_a_failed_append_is_cut_back_and_said(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n')
    real_write = os.write

    def half(fd, data):  # part of the record reaches the file, then the disk is full
        real_write(fd, bytes(data[:3]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writes, "_write_all", half)
    with pytest.raises(WriteError, match=r"cannot write metrics .*: No space left on device \[ENOSPC\]"):
        append_lines(path, ['{"b": 2}'], what=f"metrics {path}")
    assert path.read_text() == '{"a": 1}\n'


def test_a_disk_that_fills_mid_line_leaves_no_partial_record(tmp_path):
    """r3's 3: a real file whose size limit (RLIMIT_FSIZE: past it a write fails as on a full disk,
    after writing what fits) cuts a record in two. A buffered file's truncate() flushed the refused
    bytes first, failed again, and the partial line stayed; every line must be a whole record."""
    path = tmp_path / "metrics.jsonl"
    code = textwrap.dedent(f"""
        import resource, signal, json
        from trainer.writes import append_lines, WriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        p = {str(path)!r}
        append_lines(p, [json.dumps({{"type": "train", "step": 0}})])
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
        try:
            append_lines(p, [json.dumps({{"type": "train", "step": 1, "pad": "y" * 300}})])
        except WriteError as e:
            print("refused:", e)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        append_lines(p, [json.dumps({{"type": "train", "step": 2}})])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "refused:" in out.stdout and "File too large" in out.stdout, out.stdout + out.stderr
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 2]


def test_a_guarded_stdout_says_which_stream_and_a_closed_pipe_ends_quietly(tmp_path):
    full = open("/dev/full", "w")
    with pytest.raises(WriteError, match=r"^cannot write to stdout: No space left on device \[ENOSPC\]"):
        GuardedStream(full).write("x" * 10000)

    class Pipe:
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def fileno(self):
            raise ValueError("no fd")
    with pytest.raises(SystemExit):
        GuardedStream(Pipe()).write("x")


def test_a_closed_pipe_in_training_calls_the_hook_once_and_drops_the_writes(monkeypatch):
    """t4 (session 13): `autofit run | head` ended training with the quiet SystemExit(1) meant for
    `probe | head`, losing every step since the last checkpoint. Within broken_pipe_calls (training)
    the pipe's EPIPE calls the hook (the stop flag) and the writes are dropped; outside it, the
    quiet exit stands."""
    from trainer.writes import broken_pipe_calls

    class Pipe:
        closed = False

        def write(self, s):
            if self.closed:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            return len(s)

        def flush(self):
            self.write("")

        def fileno(self):
            raise ValueError("no fd")
    pipe, calls = Pipe(), []
    stream = GuardedStream(pipe)
    monkeypatch.setattr(sys, "stdout", stream)
    with broken_pipe_calls(lambda: calls.append(1)):
        assert stream.write("a") == 1 and calls == []
        pipe.closed = True
        assert stream.write("step 3") == 6 and calls == [1]  # dropped, no exception
        stream.flush()
        assert len(calls) == 2  # each failed write tells the hook; StopFlag.pipe_closed keeps the first
    assert stream.on_broken_pipe is None
    with pytest.raises(SystemExit):
        stream.write("x")


def _cfg(out, **over):
    base = dict(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4, gradient_accumulation_steps=2,
                eval_iters=1, eval_interval=1, always_save_checkpoint=True, log_interval=1, dataset="embedded",
                out_dir=str(out), max_iters=4, dtype="float32", compile=False, device="cpu")
    base.update(over)
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in base.items()])


def test_enospc_on_the_second_checkpoint_keeps_the_first_whole(tmp_path, monkeypatch):
    fail_fsync(monkeypatch, errno.ENOSPC, "ckpt.pt", after=1)
    with pytest.raises(WriteError) as e:
        train(_cfg(tmp_path / "o"), RunOptions(device=torch.device("cpu"), progress=False, max_steps=3))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write checkpoint {tmp_path / 'o' / 'ckpt.pt'} (step 2): "
                                              f"No space left on device [ENOSPC]; the previous checkpoint")
    ck = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 1
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["ckpt.pt", "metrics.jsonl"]


def test_a_resume_after_a_cut_metrics_line_writes_whole_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    base = ["run", "--device", "cpu", "--budget", "64MiB", *SMALL, "--no-probe", "--no-progress", "--out", "o"]
    assert cli(monkeypatch, capsys, *base, "--max-steps", "1")[0] == 0
    path = tmp_path / "o" / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[:-10])  # the last record cut short, as a crash mid-write leaves it
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--no-progress", "--max-steps", "2")
    assert code == 0, err
    lines = path.read_text().splitlines()
    broken = [line for line in lines if not _parses(line)]
    assert broken == [text.splitlines()[-1][:-9]]  # only the cut line, nothing glued onto it
    assert [json.loads(line)["type"] for line in lines if _parses(line)].count("run") == 2


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def test_a_fresh_run_does_not_append_to_another_runs_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.jsonl").write_text('{"type": "run"}\n')
    code, _, err = cli(monkeypatch, capsys, "run", "--device", "cpu", "--budget", "64MiB", *SMALL, "--no-probe",
                       "--out", "o", "--max-steps", "1")
    assert code == 2 and err.count("\n") == 1 and "o/metrics.jsonl holds the records of an earlier run" in err
    assert (tmp_path / "o" / "metrics.jsonl").read_text() == '{"type": "run"}\n'


def test_an_evaluation_only_folder_takes_another_run(tmp_path, monkeypatch, capsys):
    """t4 (session 13): an eval_only run (nanoGPT's eval_gpt2 configs) writes metrics.jsonl and no
    checkpoint, and every later run on that --out, the same evaluation too, was refused as 'an
    earlier run'. Evaluations only are no earlier run; one train record among them still is."""
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    small = [*SMALL, "--device", "cpu", "--budget", "64MiB", "--no-probe", "--out", "o", "--no-progress"]
    for _ in range(2):  # the same evaluation twice
        code, _, err = cli(monkeypatch, capsys, "run", *small, "--set", "eval_only=True")
        assert code == 0, err
    metrics = tmp_path / "o" / "metrics.jsonl"
    kinds = [json.loads(line)["type"] for line in metrics.read_text().splitlines()]
    assert kinds == ["run", "eval", "run", "eval"] and not (tmp_path / "o" / "ckpt.pt").exists()
    code, _, err = cli(monkeypatch, capsys, "run", *small, "--max-steps", "1")
    assert code == 0 and (tmp_path / "o" / "ckpt.pt").exists(), err
    (tmp_path / "o" / "ckpt.pt").unlink()  # a training run's records without its checkpoint: refused again
    code, _, err = cli(monkeypatch, capsys, "run", *small, "--set", "eval_only=True")
    assert code == 2 and "o/metrics.jsonl holds the records of an earlier run" in err


@pytest.mark.parametrize("stdout, words", [
    ("full", "cannot write to stdout: No space left on device [ENOSPC]"),
    ("closed", "cannot write to stdout: it is closed"),
])
def test_a_full_or_closed_stdout_is_one_line(tmp_path, stdout, words):
    out = open("/dev/full", "w") if stdout == "full" else None
    proc = subprocess.run([sys.executable, "-m", "autofit", "config"], cwd=tmp_path, stdout=out,
                          stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr


def test_a_full_disk_that_torch_saves_zip_writer_reraises_is_one_line(tmp_path):
    """torch.save's zip writer meets a full disk's OSError and raises 'unexpected pos' (a
    RuntimeError) while handling it: it was a 145-line traceback on a real full tmpfs."""
    def fill(f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 126528 vs 126416")
    with pytest.raises(WriteError, match=r"No space left on device \[ENOSPC\]"):
        atomic_write(tmp_path / "ckpt.pt", fill, what="checkpoint")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="not a disk"):  # any other RuntimeError is not a write refusal
        atomic_write(tmp_path / "ckpt.pt", lambda f: (_ for _ in ()).throw(RuntimeError("not a disk")))


def test_an_out_dir_replaced_by_a_file_mid_run_is_one_line_that_says_so(tmp_path, monkeypatch, capsys):
    """The out folder removed and a file put in its place while the run trained: the metrics
    append's mkdir said 'File exists', and the command's clean-up (os.listdir of the folder it made)
    raised NotADirectoryError over it, a traceback."""
    with pytest.raises(WriteError, match="x is a file, not a folder \\[ENOTDIR\\]"):
        (tmp_path / "x").touch()
        append_lines(tmp_path / "x" / "metrics.jsonl", ["{}"])
    import shutil
    import trainer.loop

    def swap_the_folder_then_write(self):
        shutil.rmtree(self.out_dir)
        self.out_dir.touch()
        append_lines(self.out_dir / "metrics.jsonl", ["{}"], what="metrics")
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer.loop.Trainer, "run", swap_the_folder_then_write)
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", "--device", "cpu", "--budget", "64MiB", *SMALL,
                       "--max-steps", "1", "--out", "o", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("autofit: error: cannot write metrics: o is a file, not a folder [ENOTDIR]; training stopped")
