"""`autofit data prepare`: nanoGPT's layouts written from small local texts, offline.

GPT-2 BPE paths use an injected encoder (bytes as token ids): tiktoken's encoding file is
downloaded on first use, which tests cannot do.
"""
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_run import cli as run_cli

from trainer.data import prepare as prep
from trainer.config.train_config import load_config
from trainer.data.datasets import DataError, load_dataset, read_llmc_shard
from trainer.data.prepare import Encoder, encode_chars, prepare, tokenize_to_shards

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. résolu!\n\n") * 40
BYTES = Encoder("bytes", lambda t: list(t.encode()), 0)  # stands in for GPT-2 BPE


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def nanogpt_char_reference(data: str):
    """nanoGPT's data/shakespeare_char/prepare.py, re-stated: sorted characters, 90/10 split."""
    chars = sorted(list(set(data)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(data)
    train = [stoi[c] for c in data[:int(n * 0.9)]]
    val = [stoi[c] for c in data[int(n * 0.9):]]
    return chars, train, val


# ---------------------------------------------------------------- shakespeare_char


def test_shakespeare_char_matches_nanogpts_layout(tmp_path, text_file):
    out = tmp_path / "data" / "shakespeare_char"
    done = prepare("shakespeare_char", out, input_path=text_file, progress=False)
    chars, train, val = nanogpt_char_reference(TEXT)
    np.testing.assert_array_equal(np.fromfile(out / "train.bin", dtype="<u2"), train)
    np.testing.assert_array_equal(np.fromfile(out / "val.bin", dtype="<u2"), val)
    meta = pickle.loads((out / "meta.pkl").read_bytes())  # plain pickle, as nanoGPT's sample.py reads it
    assert meta == {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    assert done.tokens == {"train": len(train), "val": len(val)} and done.vocab_size == len(chars)
    assert sorted(p.name for p in out.iterdir()) == ["meta.pkl", "train.bin", "train.bin.max.json", "val.bin",
                                                    "val.bin.max.json"]  # no staging folder left


def test_char_encoding_is_nanogpts_for_any_characters():
    text = "zebra ÄÖ 東京 \U0001F600 abc\n"
    ids, chars = encode_chars(text)
    ref_chars, train, val = nanogpt_char_reference(text)
    assert chars == ref_chars and ids.tolist() == train + val


def test_prepared_char_set_trains_a_nanogpt_config_without_vocab_size(tmp_path, text_file, monkeypatch):
    from trainer.loop import RunOptions, train
    monkeypatch.chdir(tmp_path)
    prepare("shakespeare_char", Path("data/shakespeare_char"), input_path=text_file, progress=False)
    cfg_file = tmp_path / "char.py"
    cfg_file.write_text("dataset = 'shakespeare_char'\nn_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\n"
                        "batch_size = 4\ngradient_accumulation_steps = 1\nmax_iters = 2\neval_interval = 0\n"
                        "compile = False\ndtype = 'float32'\ndevice = 'cpu'\nout_dir = 'out-char'\n")
    cfg = load_config(config_file=cfg_file)
    vocab = len(set(TEXT))
    assert cfg.vocab_size == vocab and cfg.source_of("vocab_size") == str(Path("data/shakespeare_char/meta.pkl"))
    result = train(cfg, RunOptions(max_steps=2, progress=False))
    assert result.steps == 2 and all(np.isfinite(result.losses))
    import torch
    state = torch.load(result.checkpoint, weights_only=True)
    emb = next(v for k, v in state["model"].items() if k.endswith("wte.weight"))
    assert emb.shape[0] == vocab  # the model was built with meta.pkl's vocab, not 50304


# ---------------------------------------------------------------- shakespeare (GPT-2 BPE)


def test_shakespeare_bpe_encodes_each_split_whole(tmp_path, text_file):
    out = tmp_path / "sh"
    seen = []
    enc = Encoder("bytes", lambda t: seen.append(t) or list(t.encode()), 0)
    done = prepare("shakespeare", out, input_path=text_file, encoder=enc, progress=False)
    n = len(TEXT)
    assert seen == [TEXT[:int(n * 0.9)], TEXT[int(n * 0.9):]]
    np.testing.assert_array_equal(np.fromfile(out / "train.bin", dtype="<u2"), list(seen[0].encode()))
    np.testing.assert_array_equal(np.fromfile(out / "val.bin", dtype="<u2"), list(seen[1].encode()))
    assert not (out / "meta.pkl").exists() and done.vocab_size is None
    assert load_dataset(str(out)).vocab_size == 50257  # no meta.pkl: GPT-2 tokens, as nanoGPT reads it


def test_missing_tiktoken_is_one_line_before_any_work(tmp_path, text_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails
    # the package and the checkout's extra; not 'autofit[data]' (issue 19: an unrelated autofit is on the index)
    with pytest.raises(DataError, match=r'tiktoken is not installed .*pip install tiktoken \(from an autofit checkout: '
                                        r'pip install -e "\.\[data\]"\)'):
        prepare("shakespeare", tmp_path / "sh", input_path=text_file, progress=False)
    assert not (tmp_path / "sh").exists()  # not even an empty folder, which loading would call a broken dataset


def test_tiktoken_that_cannot_load_its_encoding_is_one_line(monkeypatch):
    class FakeTiktoken:
        @staticmethod
        def get_encoding(name):
            raise ConnectionError("Max retries exceeded\nwith url: /gpt-2/encodings/main/vocab.bpe")
    monkeypatch.setitem(sys.modules, "tiktoken", FakeTiktoken)
    with pytest.raises(DataError) as e:
        prep.gpt2_encoder()
    assert "\n" not in str(e.value) and "TIKTOKEN_CACHE_DIR" in str(e.value) and "ConnectionError" in str(e.value)


# ---------------------------------------------------------------- the download (offline: urlopen replaced)


class FakeResponse:
    def __init__(self, data: bytes):
        self.data, self.headers = data, {"Content-Length": str(len(data))}

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def read(self, n):
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def test_download_is_kept_and_reused(tmp_path, monkeypatch):
    import urllib.request
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: calls.append(url) or FakeResponse(TEXT.encode()))
    out = tmp_path / "sc"
    prepare("shakespeare_char", out, progress=False)
    assert calls == [prep.TINY_SHAKESPEARE_URL] and (out / "input.txt").read_text(encoding="utf-8") == TEXT
    logs = []
    prepare("shakespeare_char", out, progress=False, force=True, log=logs.append)
    assert len(calls) == 1 and "downloaded before" in logs[0]  # nanoGPT reuses input.txt too


def test_failed_download_says_how_to_work_offline(tmp_path, monkeypatch):
    import urllib.request

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"cannot download .*name resolution; download it yourself and pass --input FILE"):
        prepare("shakespeare_char", tmp_path / "sc", progress=False)
    assert not (tmp_path / "sc" / "input.txt").exists()


# ---------------------------------------------------------------- fineweb-edu


def test_fineweb_from_local_jsonl_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    docs = ["hello world", "a", "tokens cross shard boundaries", "", "last doc"]
    rows.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    done = prepare("fineweb-edu", tmp_path / "fw", input_path=rows, encoder=Encoder("b", BYTES.encode, 50256),
                   shard_size=16, progress=False)
    expected = np.concatenate([[50256, *d.encode()] for d in docs])
    ds = load_dataset(str(tmp_path / "fw"))
    val, train = ds.split("val"), ds.split("train")
    np.testing.assert_array_equal(val.read(0, len(val)), expected[:16])
    np.testing.assert_array_equal(train.read(0, len(train)), expected[16:])
    assert done.tokens == {"val": 16, "train": len(expected) - 16}


def test_bad_jsonl_row_names_file_and_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: a row needs a \"text\" string"):
        prepare("fineweb-edu", tmp_path / "fw", input_path=rows, encoder=BYTES, shard_size=2, progress=False)
    assert not (tmp_path / "fw").exists()  # staging removed, and the folder this prepare made


def test_a_jsonl_that_is_not_utf8_is_one_line(tmp_path):
    """It was a 53-line UnicodeDecodeError traceback (shakespeare_char's text input said it in one)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "ok"}\n\xff\xfe garbage\n')
    with pytest.raises(DataError, match=r"rows\.jsonl: not UTF-8 text \(invalid start byte, byte 0xff\); FineWeb's rows are UTF-8 JSON"):
        prepare("fineweb-edu", tmp_path / "fw", input_path=rows, encoder=BYTES, shard_size=2, progress=False)
    assert not (tmp_path / "fw").exists()


def test_tokenize_to_shards_roundtrips_through_load_dataset(tmp_path):
    texts = ["hello world", "a", "tokens cross shard boundaries", "", "last doc"]
    encode = lambda t: list(t.encode())  # bytes stand in for GPT-2 BPE
    paths = tokenize_to_shards(texts, encode, tmp_path, name="tiny", shard_size=16)
    expected = np.concatenate([[50256, *encode(t)] for t in texts])
    assert [p.name for p in paths[:2]] == ["tiny_val_000000.bin", "tiny_train_000001.bin"]
    assert len(paths) == -(-len(expected) // 16)
    d = load_dataset(str(tmp_path))
    val, train = d.split("val"), d.split("train")
    np.testing.assert_array_equal(val.read(0, len(val)), expected[:16])
    np.testing.assert_array_equal(train.read(0, len(train)), expected[16:])


def test_tokenize_to_shards_stops_at_max_tokens(tmp_path):
    consumed = []

    def texts():
        for i in range(1000):
            consumed.append(i)
            yield "abcdefghi"

    paths = tokenize_to_shards(texts(), lambda t: list(t.encode()), tmp_path, name="fw",
                               shard_size=25, max_tokens=60, eot=0)
    assert sum(len(read_llmc_shard(p)) for p in paths) == 60
    assert len(consumed) == 6  # 10 tokens per document: the stream is not read past the limit
    with pytest.raises(DataError, match="max-tokens"):
        tokenize_to_shards(texts(), lambda t: [1], tmp_path / "b", shard_size=100, max_tokens=50)
    with pytest.raises(DataError, match="val shard alone"):
        tokenize_to_shards(["ab"], lambda t: [1, 2], tmp_path / "c", shard_size=100)


def test_prepare_fineweb_script_is_a_wrapper(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("prepare_fineweb", ROOT / "scripts" / "prepare_fineweb.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(prep, "gpt2_encoder", lambda: Encoder("b", BYTES.encode, 50256))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": "document %d" % i}) + "\n" for i in range(10)))
    monkeypatch.setattr(sys, "argv", ["prepare_fineweb.py", "--out", str(tmp_path / "fw"), "--input", str(rows),
                                      "--shard-size", "40", "--name", "edu"])
    assert script.main() == 0
    assert sorted(p.name for p in (tmp_path / "fw").glob("*.bin")) == [
        "edu_train_000001.bin", "edu_train_000002.bin", "edu_val_000000.bin"]
    monkeypatch.setattr(sys, "argv", ["prepare_fineweb.py", "--out", str(tmp_path / "fw"), "--input", str(rows)])
    assert script.main() == 2 and "already holds a dataset" in capsys.readouterr().err


# ---------------------------------------------------------------- checks before the work, and nothing lost


@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="tinystories"), "unknown dataset 'tinystories' to prepare; choose from shakespeare_char"),
    (dict(name="shakespear_char"), "unknown dataset 'shakespear_char' to prepare (did you mean 'shakespeare_char'?)"),
    (dict(max_tokens=10), "--max-tokens and --shard-size apply to fineweb-edu only"),
    (dict(input_path="nope.txt"), "--input nope.txt is not a file"),
])
def test_bad_requests_are_refused_before_anything_is_written(tmp_path, monkeypatch, kwargs, needle):
    monkeypatch.chdir(tmp_path)
    kwargs = {"name": "shakespeare_char", **kwargs}
    with pytest.raises(DataError) as e:
        prepare(kwargs.pop("name"), tmp_path / "out", progress=False, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_or_too_short_text(tmp_path, text_file):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        prepare("shakespeare_char", tmp_path / "f", input_path=text_file, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("a")
    with pytest.raises(DataError, match="too few for a train and a val split"):
        prepare("shakespeare_char", tmp_path / "o", input_path=short, progress=False)
    assert not (tmp_path / "o").exists()  # the folder this prepare made goes with its failure
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="too few"):
        prepare("shakespeare_char", tmp_path / "mine", input_path=short, progress=False)
    assert (tmp_path / "mine").is_dir()  # a folder the user made is kept


def test_existing_dataset_needs_force_and_force_replaces_it_whole(tmp_path, text_file):
    out = tmp_path / "d"
    prepare("shakespeare_char", out, input_path=text_file, progress=False)
    with pytest.raises(DataError, match=r"already holds a dataset \(meta.pkl, train.bin, val.bin\); add --force"):
        prepare("shakespeare", out, input_path=text_file, encoder=BYTES, progress=False)
    prepare("shakespeare", out, input_path=text_file, encoder=BYTES, force=True, progress=False)
    assert not (out / "meta.pkl").exists()  # the char set's meta.pkl would misstate the BPE set's vocab
    assert load_dataset(str(out)).vocab_size == 50257


def test_a_failure_midway_leaves_the_old_dataset_as_it_was(tmp_path, text_file):
    out = tmp_path / "d"
    prepare("shakespeare_char", out, input_path=text_file, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def breaks_on_val(t):
        calls.append(t)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while encoding the val split, after train.bin was written
        return list(t.encode())
    with pytest.raises(KeyboardInterrupt):
        prepare("shakespeare", out, input_path=text_file, encoder=Encoder("b", breaks_on_val, 0), force=True,
                progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_data_prepare(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def cli(*args):
        return run_cli(monkeypatch, capsys, *args)

    code, out, err = cli("data", "prepare", "shakespeare_char", "--input", text_file, "--no-progress")
    assert code == 0 and "wrote data/shakespeare_char" in out and "dataset = 'shakespeare_char'" in out
    assert (tmp_path / "data" / "shakespeare_char" / "meta.pkl").is_file()
    code, out, err = cli("data", "prepare", "shakespeare_char", "--input", text_file, "--no-progress")
    assert code == 2 and out == "" and err.count("\n") == 1 and "--force" in err
    code, out, err = cli("data", "prepare", "shakespeare_char", "--out", "elsewhere", "--input", text_file,
                         "--no-progress")
    assert code == 0 and "dataset = 'elsewhere'" in out
    code, _, err = cli("data", "prepare", "fineweb", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "unknown dataset 'fineweb'" in err
    # and the config that names it now takes its vocab from meta.pkl
    code, out, _ = cli("config", "--set", "dataset=shakespeare_char")
    assert code == 0 and f"vocab_size {len(set(TEXT))} from data/shakespeare_char/meta.pkl" in out


def test_piped_prepare_leaves_stderr_empty_and_its_refusal_one_line(tmp_path, text_file):
    # piped (CI, `2> log`), the transient progress bar printed a blank line on stderr: a refusal
    # was two lines, a success one blank one
    import subprocess
    cmd = [sys.executable, "-m", "autofit", "data", "prepare", "shakespeare_char", "--input", str(text_file),
           "--out", str(tmp_path / "o")]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stderr == ""
    short = tmp_path / "short.txt"
    short.write_text("a")  # refused while the bar is up
    bad = subprocess.run(cmd[:-3] + [str(short), "--out", str(tmp_path / "s")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "too few" in bad.stderr, bad.stderr


def test_prepared_files_follow_the_umask_like_nanogpts(tmp_path, text_file):
    # they were 0600 (mkstemp's private mode): a dataset prepared for a shared machine was unreadable
    # to the other users, where nanoGPT's prepare.py (np.tofile) leaves 0644 under umask 022
    import os
    import stat
    old = os.umask(0o022)
    try:
        prepare("shakespeare_char", tmp_path / "o", input_path=text_file, progress=False)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "o").iterdir()}
    assert modes == {n: 0o644 for n in ("train.bin", "val.bin", "meta.pkl", "train.bin.max.json", "val.bin.max.json")}


def test_shard_size_0_is_refused_not_read_as_the_default(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "ok"}\n')
    with pytest.raises(DataError, match=r"^--shard-size must be at least 1, got 0$"):
        prepare("fineweb-edu", tmp_path / "fw", input_path=rows, encoder=BYTES, shard_size=0, progress=False)
    assert not (tmp_path / "fw").exists()


def test_the_suggested_fineweb_commands_pass_the_option_checks():
    """r4 (session 15): README's and the missing-dataset line's `--max-tokens 100000000` was refused
    with the default --shard-size of 100,000,000 ('fills at most the val shard'): a user who typed
    the command they were given got an error. Each suggested --max-tokens must pass the checks."""
    import re
    from trainer.data.datasets import missing_dataset_message
    from trainer.data.shards import _check_sizes
    said = missing_dataset_message("openwebtext", Path("data/openwebtext"))
    readme = (ROOT / "README.md").read_text()
    suggested = [int(n) for n in re.findall(r"fineweb-edu [^\n;']*--max-tokens (\d+)", said + "\n" + readme)]
    assert len(suggested) >= 2
    for n in suggested:
        _check_sizes(100_000_000, n)  # prepare's default shard size; raises DataError when refused


def test_cli_data_prepare_says_when_a_split_is_too_short_for_runs(tmp_path, monkeypatch, capsys):
    """t9's L4: a short text was written with no word that the presets' runs cannot sample it; a
    split under the tiny preset's block_size + 1 gets a note naming the largest block_size it
    allows (a split too short for any run is refused: the next test)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eleven.txt").write_text("abcdefghijk")  # the shortest text refused by none: 9 and 2 tokens
    code, out, err = run_cli(monkeypatch, capsys, "data", "prepare", "shakespeare_char", "--input", "eleven.txt",
                             "--out", "x", "--no-progress")
    assert code == 0 and "(train 9 tokens, val 2 tokens," in out, out
    assert "note: the train and val splits have as few as 2 tokens" in err and "block_size at most 1:" in err, err
    (tmp_path / "some.txt").write_text("abcdefghij" * 100)  # 1,000 characters: 900 train, 100 val
    code, out, err = run_cli(monkeypatch, capsys, "data", "prepare", "shakespeare_char", "--input", "some.txt",
                             "--out", "y", "--no-progress")
    assert code == 0 and "note: the val split has 100 tokens" in err and "block_size at most 99" in err, err
    (tmp_path / "long.txt").write_text("abcdefghij" * 200)
    code, out, err = run_cli(monkeypatch, capsys, "data", "prepare", "shakespeare_char", "--input", "long.txt",
                             "--out", "z", "--no-progress")
    assert code == 0 and "note:" not in err, err


def test_a_text_too_short_for_any_run_is_refused_and_the_dataset_in_out_kept(tmp_path, monkeypatch, capsys):
    """t11's M2: `data prepare shakespeare_char --input a.txt --force` with a 2-character text exited 0
    and replaced a good dataset with 1-token splits, which allow no block_size (a run samples
    block_size + 1 tokens from each split); the next run failed. Now any text whose split would
    hold under 2 tokens is refused in one line, and the dataset there is kept byte for byte."""
    monkeypatch.chdir(tmp_path)
    prepare("shakespeare_char", tmp_path / "d", input_path=_text(tmp_path, TEXT), progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    for text in ("ab", "abcdefghij"):  # 1 and 1 tokens; 9 and 1
        (tmp_path / "a.txt").write_text(text)
        code, out, err = run_cli(monkeypatch, capsys, "data", "prepare", "shakespeare_char", "--input", "a.txt",
                                 "--out", "d", "--force", "--no-progress")
        assert code != 0 and err.count("\n") == 1 and "too few for a train and a val split of 2 tokens" in err, err
        assert "give a text of at least 11 characters" in err and out == "", out
        assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before


def _text(tmp_path, text: str) -> Path:
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_bpe_split_that_encodes_to_one_token_is_refused_before_writing(tmp_path):
    """shakespeare (BPE): a part of several characters can encode to 1 token; both parts are
    encoded before either file is written, and a split under 2 tokens is refused with the old
    dataset kept."""
    out = tmp_path / "d"
    prepare("shakespeare", out, input_path=_text(tmp_path, TEXT), encoder=BYTES, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_token_val = Encoder("words", lambda t: [len(w) for w in t.split()], 0)  # one token a word
    with pytest.raises(DataError, match=r"^the text encodes \(words BPE\) the val split to 1 token: too few"):
        prepare("shakespeare", out, input_path=_text(tmp_path, "ab " * 30 + "cdefghijkl"),  # val: one word
                encoder=one_token_val, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_fineweb_sizes_that_leave_a_split_of_one_token_are_refused(tmp_path):
    """The same rule for llm.c shards: the val split is the first shard (--shard-size 1: 1 token),
    the train split what --max-tokens leaves past it, or what the input holds past it."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "abcdefgh"}\n')  # 9 tokens with its end-of-text
    with pytest.raises(DataError, match=r"^--shard-size 1 makes the val split one shard of 1 token, and a run"):
        prepare("fineweb-edu", tmp_path / "a", input_path=rows, encoder=BYTES, shard_size=1, progress=False)
    with pytest.raises(DataError, match=r"^--max-tokens 5 leaves 1 token for train past the val shard of "
                                        r"--shard-size 4, and a run .*: make it 6 or more$"):
        prepare("fineweb-edu", tmp_path / "b", input_path=rows, encoder=BYTES, shard_size=4, max_tokens=5,
                progress=False)
    with pytest.raises(DataError, match=r"^only 9 tokens: 1 token for train past the val shard of 8"):
        prepare("fineweb-edu", tmp_path / "c", input_path=rows, encoder=BYTES, shard_size=8, progress=False)
    assert not any((tmp_path / n).exists() for n in "abc")
    done = prepare("fineweb-edu", tmp_path / "e", input_path=rows, encoder=BYTES, shard_size=7, progress=False)
    assert done.tokens == {"val": 7, "train": 2}
