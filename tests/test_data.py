import gzip
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data.datasets import (LLMC_MAGIC, BatchSampler, DataError, dataset_vocab, decode_bytes, load_dataset,
                          read_llmc_shard, write_llmc_shard)
from trainer.data.tokenfiles import atomic_write, max_token, sidecar_path

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nanogpt(dir: Path, train: np.ndarray, val: np.ndarray) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    train.astype(np.uint16).tofile(dir / "train.bin")
    val.astype(np.uint16).tofile(dir / "val.bin")
    return dir


# --- reading --------------------------------------------------------------------------------


def test_nanogpt_dir_is_read_as_uint16_memmap(tmp_path):
    train = np.arange(1000) * 37 % 50257
    d = load_dataset(str(_nanogpt(tmp_path / "toy", train, np.arange(100))))
    assert (d.name, d.format, d.vocab_size) == ("toy", "nanogpt", 50257)
    assert d.num_tokens("train") == 1000 and d.num_tokens("val") == 100
    part = d.split("train").parts[0]
    assert isinstance(part, np.memmap) and part.dtype == np.uint16
    np.testing.assert_array_equal(d.split("train").read(0, 1000), train)


def test_bare_name_is_found_under_data_root(tmp_path):
    _nanogpt(tmp_path / "shakespeare", np.arange(500), np.arange(50))
    assert load_dataset("shakespeare", data_root=tmp_path).num_tokens("val") == 50


def test_nanogpt_meta_pkl_gives_char_vocab_and_code_is_refused(tmp_path):
    d = _nanogpt(tmp_path / "chars", np.arange(200) % 65, np.arange(50) % 65)
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": {0: "a"}, "stoi": {"a": 0}}))
    assert load_dataset(str(d)).vocab_size == 65
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": Path("x")}))  # a class: could run code
    with pytest.raises(DataError, match="meta.pkl"):
        load_dataset(str(d))


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fineweb", data_root=tmp_path / "data")
    msg = str(e.value)
    assert "not found at" in msg and str(tmp_path / "data" / "fineweb") in msg
    assert f"autofit data prepare fineweb-edu --out {tmp_path / 'data' / 'fineweb'}" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match="'embedded'"):
        load_dataset("mystery", data_root=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "no" / "such"))


def test_dir_without_known_files_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="neither train.bin"):
        load_dataset(str(tmp_path))


def test_llmc_shard_roundtrip_and_header(tmp_path):
    toks = np.array([50256, 1, 2, 65535, 7])
    write_llmc_shard(tmp_path / "x_val_000000.bin", toks)
    raw = (tmp_path / "x_val_000000.bin").read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [LLMC_MAGIC, 1, 5] and not header[3:].any() and len(raw) == 1024 + 10
    np.testing.assert_array_equal(read_llmc_shard(tmp_path / "x_val_000000.bin"), toks)


def test_llmc_bad_magic_version_and_truncation_name_the_file(tmp_path):
    f = tmp_path / "x_train_000001.bin"
    write_llmc_shard(f, np.arange(100))
    good = f.read_bytes()
    f.write_bytes(b"\x00" * 4 + good[4:])
    with pytest.raises(DataError, match=r"x_train_000001\.bin is not an llm.c token shard"):
        read_llmc_shard(f)
    f.write_bytes(good[:4] + np.int32(2).tobytes() + good[8:])
    with pytest.raises(DataError, match="version 2"):
        read_llmc_shard(f)
    f.write_bytes(good[:-6])
    with pytest.raises(DataError, match=r"x_train_000001\.bin is truncated: header says 100 tokens"):
        read_llmc_shard(f)
    f.write_bytes(good + b"\x00\x00")
    with pytest.raises(DataError, match="longer than its header"):
        read_llmc_shard(f)
    f.write_bytes(good[:100])
    with pytest.raises(DataError, match="too short for an llm.c header"):
        read_llmc_shard(f)


def test_llmc_dir_needs_both_splits(tmp_path):
    write_llmc_shard(tmp_path / "fw_train_000001.bin", np.arange(10))
    with pytest.raises(DataError, match="no val shard"):
        load_dataset(str(tmp_path))


def test_llmc_shards_of_two_datasets_in_one_folder_are_refused(tmp_path):
    """r4 (session 15): fineweb_train_* and edu_fineweb_train_* in one folder were read as one
    dataset, silently; llm.c reads one prefix's shards."""
    for prefix in ("fineweb", "edu_fineweb"):
        write_llmc_shard(tmp_path / f"{prefix}_train_000001.bin", np.arange(100))
        write_llmc_shard(tmp_path / f"{prefix}_val_000000.bin", np.arange(40))
    with pytest.raises(DataError, match=r"llm\.c shards of 2 datasets \(edu_fineweb, fineweb\): one dataset per folder"):
        load_dataset(str(tmp_path))


def test_multi_shard_split_is_one_logical_stream(tmp_path):
    # Three train shards of different lengths; the sampler must see windows across boundaries.
    stream = np.arange(1, 301)
    for i, (a, b) in enumerate([(0, 50), (50, 60), (60, 300)]):
        write_llmc_shard(tmp_path / f"fw_train_{i + 1:06d}.bin", stream[a:b])
    write_llmc_shard(tmp_path / "fw_val_000000.bin", np.arange(40))
    d = load_dataset(str(tmp_path))
    assert (d.format, d.vocab_size, d.num_tokens("train")) == ("llmc", 50257, 300)
    assert all(isinstance(p, np.memmap) for p in d.split("train").parts)
    np.testing.assert_array_equal(d.split("train").read(45, 20), stream[45:65])
    x, y = BatchSampler(d, block_size=16, seed=3).sample("train", 400)
    # Consecutive integers: every row is a contiguous window of the stream, wherever it started.
    assert torch.all(x[:, 1:] - x[:, :-1] == 1) and torch.all(y == x + 1)
    starts = set(x[:, 0].tolist())
    assert min(starts) == 1 and max(starts) == 300 - 16  # both ends reachable, none beyond
    assert any(s < 50 < s + 17 for s in starts)  # some window crosses the first shard boundary


# --- sampling -------------------------------------------------------------------------------


@pytest.fixture
def toy(tmp_path):
    return load_dataset(str(_nanogpt(tmp_path / "toy", np.arange(5000) % 1000, np.arange(3000, 3500))))


def test_batch_shape_dtype_and_shift(toy):
    x, y = BatchSampler(toy, block_size=8, seed=0).sample("train", 5)
    assert x.shape == y.shape == (5, 8) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(x[:, 1:], y[:, :-1])
    # The toy data counts 0..999 over and over: a real window steps by one, and y is x + 1.
    assert torch.all((x[:, 1:] - x[:, :-1]) % 1000 == 1) and torch.equal(y, (x + 1) % 1000)


def test_same_seed_same_batches_and_counter_moves_on(toy):
    a, b = BatchSampler(toy, 8, seed=7), BatchSampler(toy, 8, seed=7)
    x1, _ = a.sample("train", 16)
    assert torch.equal(x1, b.sample("train", 16)[0])
    assert not torch.equal(x1, a.sample("train", 16)[0])  # counter 1 differs from counter 0
    assert not torch.equal(x1, BatchSampler(toy, 8, seed=8).sample("train", 16)[0])
    # Splits count separately: drawing val leaves the train stream where it was.
    c = BatchSampler(toy, 8, seed=7)
    c.sample("val", 4)
    assert torch.equal(c.sample("train", 16)[0], x1)


def test_state_dict_resume_gives_identical_batches(toy):
    a = BatchSampler(toy, 8, seed=1)
    for _ in range(3):
        a.sample("train", 4)
    a.sample("val", 4)
    state = a.state_dict()
    assert state["counters"] == {"train": 3, "val": 1}
    b = BatchSampler(toy, 8, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through JSON
    for split in ["train", "val", "train"]:
        assert torch.equal(a.sample(split, 6)[0], b.sample(split, 6)[0])
    with pytest.raises(DataError, match="seed"):
        BatchSampler(toy, 8, seed=2).load_state_dict(state)


def test_batch_at_redraws_a_step_and_micro_batches_do_not_change_data(toy):
    s = BatchSampler(toy, 8, seed=4)
    x, y = s.sample("train", 12)
    x2, y2 = s.batch_at("train", 12, counter=0)
    assert torch.equal(x, x2) and torch.equal(y, y2) and s.counters["train"] == 1
    # The trainer slices one step's batch; how it slices is not the sampler's business.
    assert torch.equal(torch.cat([x[:5], x[5:10], x[10:]]), x)


def test_split_shorter_than_block_is_a_data_error(toy):
    with pytest.raises(DataError, match="val split .* 500 tokens, fewer than block_size \\+ 1 = 501"):
        BatchSampler(toy, 500, seed=0).sample("val", 1)
    BatchSampler(toy, 499, seed=0).sample("val", 3)  # exactly block_size + 1 tokens is enough


def test_a_file_rewritten_in_place_under_a_run_is_one_line_a_replaced_one_reads_on(tmp_path):
    # nanoGPT's prepare.py rewrites train.bin in place (np.memmap mode 'w+'); a shorter file under
    # the memory map ends the process with SIGBUS, a same-size one silently changes the data.
    d = _nanogpt(tmp_path / "toy", np.arange(5000) % 1000, np.arange(3000, 3500))
    s = BatchSampler(load_dataset(str(d)), 8, seed=0)
    s.sample("train", 4)
    with open(d / "train.bin", "r+b") as f:  # same size, new bytes, same inode
        f.write(np.full(10, 7, dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match="train.bin was rewritten in place while this run read it "
                                        "\\(same size, modified\\)"):
        s.sample("train", 4)
    s.sample("val", 4)  # the other split's file did not change
    with open(d / "val.bin", "r+b") as f:
        f.truncate(200)
    with pytest.raises(DataError, match="val.bin was rewritten .* \\(1000 -> 200 bytes\\)"):
        s.sample("val", 4)
    # Replaced whole (a new file renamed over it, as `autofit data prepare` writes): the map holds
    # the old file's pages, so the run reads on what it started with.
    d2 = _nanogpt(tmp_path / "fresh", np.arange(5000) % 1000, np.arange(3000, 3500))
    s2 = BatchSampler(load_dataset(str(d2)), 8, seed=0)
    x = s2.batch_at("train", 4, 0)[0]
    (np.arange(6000) % 13).astype(np.uint16).tofile(tmp_path / "new.bin")
    (tmp_path / "new.bin").replace(d2 / "train.bin")
    assert torch.equal(s2.batch_at("train", 4, 0)[0], x)


def test_check_vocab(toy):
    toy.check_vocab(50304)
    # no meta.pkl: GPT-2's vocab is assumed, not declared; as in nanoGPT, any vocab that holds every
    # stored id (here up to 3499) trains (issue 19)
    toy.check_vocab(3500)
    with pytest.raises(DataError, match="train.bin holds token id 999, but vocab_size is 256"):
        toy.check_vocab(256)


def test_missing_dataset_names_the_command_that_prepares_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("shakespeare_char", "shakespeare", "fineweb-edu"):
        with pytest.raises(DataError) as e:
            load_dataset(name)
        msg = str(e.value)
        assert f"dataset '{name}' not found at data/{name} (under {tmp_path})" in msg
        assert msg.endswith(f"prepare it with: autofit data prepare {name} --out data/{name}") and "\n" not in msg
    with pytest.raises(DataError, match="nanoGPT's data/openwebtext/prepare.py .*dataset='embedded'"):
        load_dataset("openwebtext")


def test_dataset_vocab_reads_meta_pkl_only(tmp_path):
    d = _nanogpt(tmp_path / "data" / "chars", np.arange(10), np.arange(10))
    assert dataset_vocab("chars", data_root=tmp_path / "data") is None  # no meta.pkl: GPT-2 BPE
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65}))
    assert dataset_vocab("chars", data_root=tmp_path / "data") == (65, str(d / "meta.pkl"))
    assert dataset_vocab(str(d)) == (65, str(d / "meta.pkl"))
    assert dataset_vocab("absent", data_root=tmp_path / "data") is None
    assert dataset_vocab("embedded")[0] == 256
    for bad in ({"vocab_size": "65"}, {"vocab_size": True}, {"vocab_size": 0}, ["vocab_size"]):
        (d / "meta.pkl").write_bytes(pickle.dumps(bad))
        with pytest.raises(DataError, match=r"cannot read vocab_size from .*meta\.pkl"):
            dataset_vocab(str(d))
    # t4, r1 (session 13): pickle's 'invalid literal for int()' or "invalid load key, '{'" was the line
    for junk in (b"garbage\n", b"", b'{"vocab_size": 65}', b"vocab_size = 65\n"):
        (d / "meta.pkl").write_bytes(junk)
        with pytest.raises(DataError, match=r"meta\.pkl: it is not a pickle as nanoGPT's prepare\.py writes meta\.pkl "
                                            r"\((ValueError|EOFError|UnpicklingError)\); prepare the dataset again"):
            dataset_vocab(str(d))


# --- token ids against vocab_size --------------------------------------------------------------


def test_token_id_at_or_above_vocab_is_one_line_naming_file_id_and_vocab(tmp_path):
    # the case: a 65-token meta.pkl and ids up to 199
    d = _nanogpt(tmp_path / "chars", np.arange(300) % 65, np.array([1, 2, 199, 3] * 50))
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65}))
    ds = load_dataset(str(d))
    with pytest.raises(DataError) as e:
        ds.check_vocab(65)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'val.bin'} holds token id 199, but vocab_size is 65 ({d / 'meta.pkl'} declares 65)")
    assert "at least 200" in msg and "\n" not in msg
    ds.check_vocab(200)  # large enough: fine


def test_llmc_shard_ids_are_checked_too(tmp_path):
    write_llmc_shard(tmp_path / "fw_val_000000.bin", np.arange(100))
    write_llmc_shard(tmp_path / "fw_train_000001.bin", np.arange(100))
    write_llmc_shard(tmp_path / "fw_train_000002.bin", np.array([5, 60000, 7]))
    ds = load_dataset(str(tmp_path))
    with pytest.raises(DataError, match=r"fw_train_000002\.bin holds token id 60000, but vocab_size is 50304"):
        ds.check_vocab(50304)
    ds.check_vocab(60001)


def test_largest_id_is_scanned_once_and_kept_in_a_sidecar(tmp_path):
    d = _nanogpt(tmp_path / "toy", np.array([3, 9, 4]), np.array([1, 2]))
    arr = load_dataset(str(d)).split("train").parts[0]
    assert max_token(d / "train.bin", arr) == 9
    side = sidecar_path(d / "train.bin")
    rec = json.loads(side.read_text())
    assert rec["max_token"] == 9 and rec["size"] == 6
    # A fresh process trusts a sidecar that matches the file's size and mtime (proved here by a
    # planted value the scan would never give) ...
    from trainer.data import tokenfiles
    tokenfiles._MEMO.clear()
    side.write_text(json.dumps({**rec, "max_token": 1234}))
    assert max_token(d / "train.bin", arr) == 1234
    # ... and rescans when the file changed or the sidecar is damaged.
    tokenfiles._MEMO.clear()
    np.array([3, 9, 4, 11], dtype=np.uint16).tofile(d / "train.bin")
    arr = load_dataset(str(d)).split("train").parts[0]
    assert max_token(d / "train.bin", arr) == 11 and json.loads(side.read_text())["max_token"] == 11
    tokenfiles._MEMO.clear()
    side.write_text("{not json")
    assert max_token(d / "train.bin", arr) == 11


def test_unwritable_dataset_is_checked_without_a_sidecar(tmp_path, monkeypatch):
    d = _nanogpt(tmp_path / "ro", np.array([3, 60000]), np.array([1, 2]))
    from trainer.data import tokenfiles

    def read_only(path, write):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(tokenfiles, "atomic_write", read_only)  # as in a read-only folder, even for root
    with pytest.raises(DataError, match=r"holds token id 60000, but vocab_size is 50304: token ids must be below"):
        load_dataset(str(d)).check_vocab(50304)
    assert not sidecar_path(d / "train.bin").exists()


def test_vocab_beyond_the_token_type_is_not_scanned(tmp_path, monkeypatch):
    d = _nanogpt(tmp_path / "toy", np.array([65535]), np.array([1]))
    from trainer.data import datasets as data
    monkeypatch.setattr(data, "max_token", lambda *a: pytest.fail("scanned"))
    load_dataset(str(d)).check_vocab(65536)  # no uint16 id can reach 65536
    load_dataset("embedded").check_vocab(256)  # bytes never reach 256


@pytest.mark.parametrize("kind", ["nanogpt", "llmc"])
def test_a_vocab_above_what_uint16_files_hold_is_one_line(tmp_path, kind):
    """A tokenizer of more than 65,536 ids (tiktoken's cl100k_base, 100,277) cannot be stored in
    uint16 .bin files (nanoGPT's np.uint16 cast wraps its ids around, silently): a vocab_size above
    65,536 on such files is refused before training, not trained on ids the data cannot hold."""
    if kind == "nanogpt":
        d = _nanogpt(tmp_path / "cl100k", np.arange(500) * 131 % 65536, np.arange(50))
        files = "nanoGPT .bin files"
    else:
        d = tmp_path / "cl100k"
        d.mkdir()
        write_llmc_shard(d / "cl_train_000001.bin", np.arange(500))
        write_llmc_shard(d / "cl_val_000000.bin", np.arange(50))
        files = "llm.c GPT-2 shards"
    data = load_dataset(str(d))
    with pytest.raises(DataError) as refused:
        data.check_vocab(100277)
    assert str(refused.value) == (f"vocab_size 100,277 is above the 65,536 token ids that dataset 'cl100k' can hold: "
                                  f"its {files} store each token as uint16 (ids 0 to 65,535), so a tokenizer with "
                                  f"more ids (tiktoken's cl100k_base: 100,277) cannot be written to them; use a "
                                  f"tokenizer of at most 65,536 ids, or set vocab_size <= 65536 if every id of yours "
                                  f"is below it")
    with pytest.raises(DataError, match=r"65,537 is above .*; resume it on the data it trained on$"):
        data.check_vocab(65537, "resume it on the data it trained on")  # a resumed model's vocab cannot change
    data.check_vocab(65536)  # every uint16 id fits: trains
    load_dataset("embedded").check_vocab(100277)  # the built-in bytes are no uint16 file: a large vocab is only unused


@pytest.mark.parametrize("vocab_size", [65536, 100277])
def test_a_meta_pkl_declaring_more_ids_than_uint16_holds_is_one_line_without_a_loop(tmp_path, vocab_size):
    """r8 (session 18): a meta.pkl declaring 100,277 ids beside uint16 .bin files (a cl100k_base
    prepare, nanoGPT-style) was refused at vocab_size 100,277 with 'set vocab_size <= 65536 if every
    id of yours is below it', and at 65,536 with 'set vocab_size >= 100277': each refusal's advice
    led to the other. The dataset itself declares ids its files cannot hold: said once, both ways."""
    d = _nanogpt(tmp_path / "cl100k", np.arange(500) * 131 % 65536, np.arange(50))
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 100277}, f)
    with pytest.raises(DataError) as refused:
        load_dataset(str(d)).check_vocab(vocab_size)
    assert str(refused.value) == (f"dataset 'cl100k' declares 100,277 token ids in {d / 'meta.pkl'}, more than the "
                                  f"65,536 its nanoGPT .bin files can hold (uint16, ids 0 to 65,535): any id above "
                                  f"65,535 was wrapped around when the files were written (nanoGPT's prepare.py casts "
                                  f"with np.uint16), so no vocab_size trains it as it is; prepare it again with a "
                                  f"tokenizer of at most 65,536 ids")


def test_llama3_and_eval_files_are_named(tmp_path):
    f = tmp_path / "llama_train_000001.bin"
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240801, 7, 3)
    f.write_bytes(header.tobytes() + np.array([1, 2, 128000], dtype="<u4").tobytes())
    with pytest.raises(DataError, match=r"llama_train_000001\.bin is an llm.c Llama-3 shard \(uint32 tokens"):
        read_llmc_shard(f)
    header[:3] = (20240522, 1, 10)
    f.write_bytes(header.tobytes())
    with pytest.raises(DataError, match="llm.c eval file .* not a token shard"):
        read_llmc_shard(f)


def test_writes_are_atomic(tmp_path):
    f = tmp_path / "x_val_000000.bin"
    write_llmc_shard(f, np.arange(10))
    before = f.read_bytes()

    def fail_midway(fh):
        fh.write(b"partial")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(f, fail_midway)
    assert f.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "x_val_000000.bin", "x_val_000000.bin.max.json"]  # no temp file left behind
    with pytest.raises(DataError, match="do not fit in uint16"):
        write_llmc_shard(f, [70000])
    assert f.read_bytes() == before


# --- embedded -------------------------------------------------------------------------------


def test_embedded_loads_with_byte_vocab_and_decodes():
    d = load_dataset("embedded")
    assert (d.name, d.vocab_size) == ("embedded", 256)
    assert d.num_tokens("train") > 1_000_000 and d.num_tokens("val") > 50_000
    d.check_vocab(256)
    with pytest.raises(DataError):
        d.check_vocab(100)
    x, y = BatchSampler(d, block_size=64, seed=0).sample("train", 4)
    assert x.dtype == torch.int64 and int(x.max()) < 128  # ASCII text
    text = decode_bytes(x[0])
    assert len(text) == 64 and all(c.isprintable() or c == "\n" for c in text)
    assert decode_bytes(np.frombuffer(b"a cat", dtype=np.uint8)) == "a cat"
    with pytest.raises(DataError):
        decode_bytes([300])


@pytest.mark.parametrize("folder, as_path", [("data/embedded", "data/embedded"), ("embedded", "./embedded")])
def test_embedded_is_refused_where_a_dataset_of_yours_has_that_name(tmp_path, monkeypatch, folder, as_path):
    """dataset='embedded' read the built-in corpus silently though data/embedded/ (nanoGPT's
    data/NAME) or ./embedded held the user's own prepared data: one line names both and how to
    pick each; the path it gives reads the user's folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / folder).mkdir(parents=True)
    (tmp_path / folder / "notes.txt").write_text("no dataset here")  # a folder that holds no dataset: no conflict
    assert load_dataset("embedded").format == "embedded"
    _nanogpt(tmp_path / folder, np.arange(500) % 65, np.arange(50) % 65)
    with pytest.raises(DataError) as refused:
        load_dataset("embedded")
    assert str(refused.value) == (f"dataset 'embedded' names both autofit's built-in corpus and your dataset in "
                                  f"{as_path}: set dataset='{as_path}' (a path) to train on yours, or rename that "
                                  f"folder to train on the built-in corpus")
    mine = load_dataset(as_path)
    assert (mine.format, mine.num_tokens("train"), mine.num_tokens("val")) == ("nanogpt", 500, 50)
    (tmp_path / folder).rename(tmp_path / "renamed")
    assert load_dataset("embedded").format == "embedded"  # renamed: the built-in corpus again


def test_embedded_is_refused_beside_your_llmc_shards_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "embedded").mkdir(parents=True)
    write_llmc_shard(tmp_path / "data" / "embedded" / "fw_train_000001.bin", np.arange(100))
    with pytest.raises(DataError, match=r"^dataset 'embedded' names both .* in data/embedded: set "
                                        r"dataset='data/embedded'"):
        load_dataset("embedded")


def test_embedded_files_match_their_generator():
    gen = _script("make_embedded_data")
    files = gen.build()
    root = ROOT / "trainer" / "embedded"
    for name, blob in files.items():
        assert (root / name).read_bytes() == blob, f"{name} is stale; run scripts/make_embedded_data.py"
    meta = json.loads(files["meta.json"])
    assert meta["bits_per_byte"]["bigram_conditional"] < 4.0  # far from random bytes (8 bits)
    assert len(gzip.decompress(files["val.bin.gz"])) == meta["splits"]["val"]["tokens"]


def test_a_vocab_size_above_the_characters_is_said(tmp_path):
    """t4 (session 13): configs/shakespeare_char.py pins vocab_size 65; on one's own text of 17
    characters it trained a 65-id model in silence (nanoGPT takes meta.pkl's)."""
    from autofit.launch.checks import check_data
    from trainer.config.train_config import load_config
    from trainer.data.prepare import prepare
    src = tmp_path / "t.txt"
    src.write_text("the quick brown fox\n" * 300)
    prepare("shakespeare_char", tmp_path / "d", input_path=src, progress=False)
    said = []
    check_data(load_config(preset="tiny", overrides=[f"dataset={tmp_path / 'd'}", "vocab_size=65"]), log=said.append)
    assert said == [f"note: vocab_size 65 (--set) is above the 17 characters {tmp_path / 'd' / 'meta.pkl'} declares: "
                    f"ids 17 to 64 never occur (drop vocab_size from the config to take meta.pkl's, as nanoGPT does)"]
    said.clear()
    check_data(load_config(preset="tiny", overrides=[f"dataset={tmp_path / 'd'}"]), log=said.append)
    assert said == []  # meta.pkl's own vocab_size


def test_a_vocab_size_the_config_does_not_set_is_not_advised_dropped(tmp_path, monkeypatch):
    """t5's M2 (session 14): with init_from = 'gpt2' vocab_size 50257 is the weights', not meta.pkl's
    (the source said meta.pkl), and the note told the user to drop a vocab_size their config did not
    set; a preset that fixes its vocab_size (nanochat-d12) is not the config's either."""
    import trainer.model.pretrained as pretrained
    from autofit.launch.checks import check_data
    from trainer.config.train_config import load_config
    from trainer.data.prepare import prepare
    src = tmp_path / "t.txt"
    src.write_text("the quick brown fox\n" * 300)
    prepare("shakespeare_char", tmp_path / "d", input_path=src, progress=False)
    monkeypatch.setattr(pretrained, "locate_gpt2", lambda model_type: None)  # no network here
    cfg = pretrained.gpt2_config(load_config(preset="tiny", overrides=[f"dataset={tmp_path / 'd'}", "init_from=gpt2"]))
    assert (cfg.vocab_size, cfg.source_of("vocab_size")) == (50257, "the gpt2 weights")
    said = []
    check_data(cfg, log=said.append)
    assert len(said) == 1 and "(the gpt2 weights)" in said[0] and "drop vocab_size" not in said[0], said
    assert "gpt2's weights fix vocab_size" in said[0]
    said.clear()
    check_data(load_config(preset="nanochat-d12", overrides=[f"dataset={tmp_path / 'd'}", "block_size=32"]),
               log=said.append)
    assert len(said) == 1 and said[0].endswith("(preset nanochat-d12 fixes it; --set vocab_size=17 to take "
                                               "meta.pkl's)"), said
