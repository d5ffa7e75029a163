"""`autofit data prepare` stopped by a Ctrl-C or SIGTERM (issue 19, "every long phase stops and
speaks"): the signal is acted on at the next document or shard boundary, every finished shard is
kept whole, nothing half-written is left under a final name, one line says what was kept and how
to continue, the exit is 130, and the same command run again continues, ending byte for byte
where an uninterrupted run does. Signals are real (os.kill of this process), sent from an
injected tokenizer or write at a chosen point: no timing is involved.
"""
import errno
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from cli_run import cli as run_cli

from trainer.data import prepare as prep
from trainer.data import shards as shards_mod
from trainer.data.datasets import DataError
from trainer.data.prepare import Encoder, PrepareStopped, partial_folder, prepare
from trainer.writes import WriteError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [f"doc {i:02d} " * (i % 4 + 1) for i in range(30)]  # 7 bytes a repeat: 8, 15, 22, 29 tokens with the eot
SIZE = 16  # tokens per shard: documents cross shard ends, some in their middle
EOT = 50256


def lengths() -> list[int]:
    return [len(d.encode()) + 1 for d in DOCS]


def counting(signal_at: int | None = None, sig: int = signal.SIGINT, times: int = 1):
    """A bytes 'BPE' that records the documents it encodes and, on the signal_at-th (0-based),
    sends this process `sig`, `times` times (twice: the second one is the 'stop at once')."""
    calls = []

    def encode(text: str) -> list[int]:
        if len(calls) == signal_at:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        calls.append(text)
        return list(text.encode())
    return Encoder("bytes", encode, EOT), calls


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


@pytest.fixture
def reference(tmp_path, rows) -> list[bytes]:
    """The shards of an uninterrupted run, in order."""
    done = prepare("fineweb-edu", tmp_path / "ref", input_path=rows, encoder=counting()[0], shard_size=SIZE,
                   progress=False)
    return [p.read_bytes() for p in done.files]


def shard_bytes(folder: Path, count: int) -> list[bytes]:
    return [shards_mod.shard_path(folder, "fineweb", i).read_bytes() for i in range(count)]


def leftovers(folder: Path) -> list[str]:
    """Temp files anywhere under folder (a write cut short would leave one)."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")]


def kept_after_signal_in(doc: int) -> int:
    """Shards finished when a signal comes while document `doc` is tokenized: it is acted on at
    the first shard end inside that document, else after the document."""
    start = sum(lengths()[:doc])
    end = start + lengths()[doc]
    first_end = (start // SIZE + 1) * SIZE
    return (first_end if first_end < end else end) // SIZE


def first_doc_of_shard(k: int) -> int:
    """The document holding token k * SIZE: where a run continuing after k shards starts reading."""
    ends, total = [], 0
    for n in lengths():
        total += n
        ends.append(total)
    return next(i for i, e in enumerate(ends) if e > k * SIZE)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("doc", [0, 4, 6, 9])
def test_a_signal_keeps_the_finished_shards_and_the_same_command_continues(tmp_path, rows, reference, sig, doc):
    out = tmp_path / "fw"
    encoder, calls = counting(signal_at=doc, sig=sig)
    with pytest.raises(PrepareStopped) as stopped:
        prepare("fineweb-edu", out, input_path=rows, encoder=encoder, shard_size=SIZE, progress=False)
    assert len(calls) == doc + 1  # acted on at the next boundary: no document tokenized past the one in hand
    k = kept_after_signal_in(doc)
    partial = partial_folder(out, "fineweb")
    line = str(stopped.value)
    assert "\n" not in line and f"stopped by {signal.Signals(sig).name} at the next boundary" in line
    assert not list(out.glob("*.bin")) and leftovers(tmp_path) == []  # nothing under a final name, no temp file
    if k == 0:
        assert "before the first shard was finished" in line and "run the same command again to start over" in line
        assert not out.exists()  # the folder this prepare made goes with it: nothing was kept
    else:
        assert f"{k} finished shard{'s' if k > 1 else ''} ({k * SIZE:,} tokens) kept in {partial}" in line
        assert f"run the same command again to continue from shard {k}" in line
        assert sorted(partial.glob("*.bin")) == sorted(shards_mod.shard_path(partial, "fineweb", i) for i in range(k))
        assert shard_bytes(partial, k) == reference[:k]  # each kept shard whole, as the uninterrupted run's
        progress = json.loads((partial / "progress.json").read_text())
        assert progress["shards"] == [SIZE] * k and progress["next_doc"] == first_doc_of_shard(k)

    logs = []
    encoder, calls = counting()
    done = prepare("fineweb-edu", out, input_path=rows, encoder=encoder, shard_size=SIZE, progress=False,
                   log=logs.append)
    start = first_doc_of_shard(k) if k else 0
    assert calls == DOCS[start:]  # continued: the kept shards' documents are skipped, not tokenized again
    assert any("continuing a stopped preparation" in line for line in logs) == (k > 0)
    assert [p.read_bytes() for p in done.files] == reference and not partial.exists()
    assert done.tokens == {"val": SIZE, "train": sum(lengths()) - SIZE}


def test_a_second_signal_stops_at_once_and_keeps_what_was_finished(tmp_path, rows, reference):
    out = tmp_path / "fw"
    encoder, calls = counting(signal_at=6, times=2)  # the second SIGINT arrives inside the tokenizer
    with pytest.raises(PrepareStopped) as stopped:
        prepare("fineweb-edu", out, input_path=rows, encoder=encoder, shard_size=SIZE, progress=False)
    k = sum(lengths()[:6]) // SIZE  # the shards finished before document 6
    assert "stopped at once by a second signal (the first: SIGINT)" in str(stopped.value)
    assert f"{k} finished shards" in str(stopped.value)
    partial = partial_folder(out, "fineweb")
    assert shard_bytes(partial, k) == reference[:k] and not shards_mod.shard_path(partial, "fineweb", k).exists()
    done = prepare("fineweb-edu", out, input_path=rows, encoder=counting()[0], shard_size=SIZE, progress=False)
    assert [p.read_bytes() for p in done.files] == reference


def test_a_second_signal_while_a_shard_is_written_leaves_no_half_shard(tmp_path, rows, reference, monkeypatch):
    # Ctrl-C twice while shard 3's bytes go to disk: that shard is dropped (its temp file removed),
    # shards 0-2 and their record stay, and a re-run writes shard 3 whole.
    real_fsync = os.fsync

    def fsync(fd):
        if "fineweb_train_000003" in os.readlink(f"/proc/self/fd/{fd}"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "fw"
    with pytest.raises(PrepareStopped, match="stopped at once .* 3 finished shards"):
        prepare("fineweb-edu", out, input_path=rows, encoder=counting()[0], shard_size=SIZE, progress=False)
    monkeypatch.setattr(os, "fsync", real_fsync)
    partial = partial_folder(out, "fineweb")
    assert sorted(p.name for p in partial.iterdir()) == [
        "fineweb_train_000001.bin", "fineweb_train_000001.bin.max.json", "fineweb_train_000002.bin",
        "fineweb_train_000002.bin.max.json", "fineweb_val_000000.bin", "fineweb_val_000000.bin.max.json",
        "progress.json"]
    assert shard_bytes(partial, 3) == reference[:3] and leftovers(tmp_path) == []
    done = prepare("fineweb-edu", out, input_path=rows, encoder=counting()[0], shard_size=SIZE, progress=False)
    assert [p.read_bytes() for p in done.files] == reference


def test_a_full_disk_keeps_the_finished_shards_for_the_next_run(tmp_path, rows, reference, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up at shard 4
        if "fineweb_train_000004" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "fw"
    with pytest.raises(WriteError) as e:
        prepare("fineweb-edu", out, input_path=rows, encoder=counting()[0], shard_size=SIZE, progress=False)
    assert "[ENOSPC]" in str(e.value) and "4 finished shards (64 tokens) kept in" in str(e.value)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert leftovers(tmp_path) == []
    encoder, calls = counting()
    done = prepare("fineweb-edu", out, input_path=rows, encoder=encoder, shard_size=SIZE, progress=False)
    assert calls == DOCS[first_doc_of_shard(4):] and [p.read_bytes() for p in done.files] == reference


def test_a_stopped_preparation_with_other_options_or_damaged_is_refused_before_any_work(tmp_path, rows):
    out = tmp_path / "fw"
    with pytest.raises(PrepareStopped):
        prepare("fineweb-edu", out, input_path=rows, encoder=counting(signal_at=9)[0], shard_size=SIZE,
                progress=False)
    partial = partial_folder(out, "fineweb")
    before = {p.name: p.read_bytes() for p in partial.iterdir()}
    encoder, calls = counting()
    with pytest.raises(DataError) as e:  # another shard size would mix two datasets
        prepare("fineweb-edu", out, input_path=rows, encoder=encoder, shard_size=SIZE * 2, progress=False)
    assert "\n" not in str(e.value) and "stopped with other options (shard_size 16, now 32)" in str(e.value)
    assert f"delete {partial} to start over" in str(e.value) and calls == []
    (partial / "fineweb_train_000002.bin").write_bytes(b"cut")
    with pytest.raises(DataError, match=r"fineweb_train_000002\.bin, a finished shard .* cannot be read"):
        prepare("fineweb-edu", out, input_path=rows, encoder=encoder, shard_size=SIZE, progress=False)
    (partial / "progress.json").write_text('{"version": 1, "options": {}, "shards": [-3]}')
    with pytest.raises(DataError, match=r"progress\.json \(a stopped preparation's record\) is damaged"):
        prepare("fineweb-edu", out, input_path=rows, encoder=encoder, shard_size=SIZE, progress=False)
    assert calls == [] and set(before) == {p.name for p in partial.iterdir()}  # refused, nothing deleted


def test_cli_says_what_was_kept_exits_143_and_continues(tmp_path, rows, reference, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    encoder, _ = counting(signal_at=9, sig=signal.SIGTERM)
    monkeypatch.setattr(prep, "gpt2_encoder", lambda: encoder)
    args = ("data", "prepare", "fineweb-edu", "--input", rows, "--shard-size", SIZE, "--out", "fw", "--no-progress")
    code, out, err = run_cli(monkeypatch, capsys, *args)
    k = kept_after_signal_in(9)
    last = err.strip()
    assert code == 143 and out == "" and err.count("\n") == 1, err  # 128 + SIGTERM; one line, unwrapped
    assert last.startswith(f"autofit: stopped by SIGTERM at the next boundary; the shard in hand was dropped; {k} finished "
                           f"shards ({k * SIZE} tokens) kept in fw/.prepare-fineweb.partial; no dataset was written")
    assert last.endswith(f"run the same command again to continue from shard {k}")
    monkeypatch.setattr(prep, "gpt2_encoder", lambda: counting()[0])
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "wrote fw" in out and "continuing a stopped preparation" in err
    files = sorted(Path("fw").glob("*.bin"), key=lambda p: p.name[-10:])
    assert [p.read_bytes() for p in files] == reference


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_prepare_fineweb_script_exits_128_plus_the_signal_and_continues(tmp_path, rows, reference, monkeypatch, capsys, sig):
    import importlib.util
    spec = importlib.util.spec_from_file_location("prepare_fineweb", ROOT / "scripts" / "prepare_fineweb.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    encoder, _ = counting(signal_at=6, sig=sig)
    monkeypatch.setattr(prep, "gpt2_encoder", lambda: encoder)
    monkeypatch.setattr(sys, "argv", ["prepare_fineweb.py", "--out", str(tmp_path / "fw"), "--input", str(rows),
                                      "--shard-size", str(SIZE)])
    assert script.main() == 128 + sig  # 130 a Ctrl-C, 129 a SIGHUP
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same command again to continue" in err
    monkeypatch.setattr(prep, "gpt2_encoder", lambda: counting()[0])
    assert script.main() == 0
    files = sorted((tmp_path / "fw").glob("*.bin"), key=lambda p: p.name[-10:])
    assert [p.read_bytes() for p in files] == reference


class SlowResponse:
    """urlopen's response, in chunks of 64 KiB as download_text reads; sends SIGINT on the first read."""

    def __init__(self, data: bytes, signal_first: bool):
        self.data, self.headers, self.signal_first = data, {"Content-Length": str(len(data))}, signal_first

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def read(self, n):
        if self.signal_first:
            self.signal_first = False
            os.kill(os.getpid(), signal.SIGINT)
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def test_the_small_sets_stop_between_pieces_and_start_over(tmp_path, monkeypatch):
    import urllib.request
    text = ("To be, or not to be, that is the question:\n" * 4000)  # 172 kB: three chunks of download
    out = tmp_path / "sh"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: SlowResponse(text.encode(), True))
    with pytest.raises(PrepareStopped) as stopped:  # during the download: the chunks read are dropped
        prepare("shakespeare_char", out, progress=False)
    assert "before the dataset was written; no dataset was written to" in str(stopped.value)
    assert "run the same command again to start over" in str(stopped.value) and not out.exists()

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: SlowResponse(text.encode(), False))
    prepare("shakespeare_char", out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    encoded = []

    def encode(t):  # SIGTERM while the train split is encoded: val is never started
        encoded.append(t)
        os.kill(os.getpid(), signal.SIGTERM)
        return list(t.encode())
    with pytest.raises(PrepareStopped) as stopped:
        prepare("shakespeare", out, encoder=Encoder("b", encode, 0), force=True, progress=False)
    assert len(encoded) == 1 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    line = str(stopped.value)
    assert line.startswith("stopped by SIGTERM at the next boundary before the dataset was written; "
                           f"the dataset in {out} is as it was; {out / 'input.txt'} (downloaded) is kept")
    done = prepare("shakespeare", out, encoder=Encoder("b", lambda t: list(t.encode()), 0), force=True, progress=False)
    assert done.tokens["train"] + done.tokens["val"] == len(text) and not (out / "meta.pkl").exists()


def test_a_stop_during_the_last_write_keeps_the_old_dataset(tmp_path, monkeypatch):
    """A Ctrl-C while shakespeare_char wrote its files (no boundary after them) was dropped: the
    --force replacement went through and the command exited 0."""
    from trainer.data import text_tokens
    src_a, src_b = tmp_path / "a.txt", tmp_path / "b.txt"
    src_a.write_text("first text, " * 300)
    src_b.write_text("second text. " * 300)
    out = tmp_path / "d"
    prepare("shakespeare_char", out, input_path=src_a, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = text_tokens.atomic_write

    def write_then_ctrl_c(path, *a, **k):  # meta.pkl, the last file
        real(path, *a, **k)
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(text_tokens, "atomic_write", write_then_ctrl_c)
    with pytest.raises(PrepareStopped):
        prepare("shakespeare_char", out, input_path=src_b, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_two_signals_while_the_new_files_are_renamed_in_leave_no_mixed_dataset(tmp_path, monkeypatch):
    """Two Ctrl-Cs right after the first new file was renamed over the old (the renames take
    milliseconds): the second stopped at once, leaving the new meta.pkl beside the old train.bin,
    and the line said the old dataset was as it was. The renames now finish: one dataset, whole."""
    src_a, src_b = tmp_path / "a.txt", tmp_path / "b.txt"
    src_a.write_text("first text, " * 300)
    src_b.write_text("SECOND TEXT WITH OTHER LETTERS. " * 300)
    out, want = tmp_path / "d", tmp_path / "want"
    prepare("shakespeare_char", out, input_path=src_a, progress=False)
    prepare("shakespeare_char", want, input_path=src_b, progress=False)
    real, sent = os.replace, []

    def replace_then_two_signals(src, dst, *a, **k):
        real(src, dst, *a, **k)
        if Path(dst).parent == out and not sent:
            sent.append(dst)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(os, "replace", replace_then_two_signals)
    prepare("shakespeare_char", out, input_path=src_b, force=True, progress=False)
    def dataset(d):  # not the token-id sidecars: they name their file's inode
        return {p.name: p.read_bytes() for p in d.iterdir() if not p.name.endswith(".max.json")}
    assert sent and dataset(out) == dataset(want) and len(dataset(want)) == 3


def test_encode_chars_in_chunks_is_nanogpts_encoding(monkeypatch):
    """Chunked (the stop boundaries of a large text), the ids and vocabulary are nanoGPT's:
    sorted(set(text)), each character's index there, characters past the BMP too."""
    text = "héllo wörld 🙂 naïve\n" * 7 + "z"
    from trainer.data import text_tokens
    monkeypatch.setattr(text_tokens, "CHAR_CHUNK", 5)
    calls = []
    ids, chars = prep.encode_chars(text, lambda: calls.append(1))
    want = sorted(set(text))
    assert chars == want and ids.tolist() == [want.index(c) for c in text] and ids.dtype.name == "uint16"
    assert len(calls) == 2 * -(-len(text) // 5)  # a boundary before every chunk of both passes


def test_a_large_character_text_stops_within_a_chunk_and_says_so_at_once(tmp_path, monkeypatch, capfd):
    """t3 (session 12): on a 156 MB text a Ctrl-C was neither answered nor acted on until the whole
    text was encoded (no boundary inside a character prepare). Now the notice is written when the
    signal comes, and the stop happens at the next chunk."""
    src = tmp_path / "big.txt"
    src.write_text("Some text here and there.\n" * 400)
    from trainer.data import text_tokens
    monkeypatch.setattr(text_tokens, "CHAR_CHUNK", 100)
    advanced = []

    class Bar:  # the progress bar's advance: a Ctrl-C after the first chunk's ids
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, *a, **k):
            return 0

        def advance(self, task, n):
            advanced.append(n)
            if len(advanced) == 1:
                os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(prep, "_progress", lambda enabled, log: Bar())
    with pytest.raises(PrepareStopped) as stopped:
        prepare("shakespeare_char", tmp_path / "d", input_path=src, progress=False)
    assert advanced == [100]  # stopped at the next chunk, not after 104 of them
    assert "no dataset was written to" in str(stopped.value) and not (tmp_path / "d").exists()
    assert capfd.readouterr().err.count(prep.STOP_NOTICE) == 1
