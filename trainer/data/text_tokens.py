"""A text's tokens in the small sets' layouts: nanoGPT's data/shakespeare_char/prepare.py (one
token per character, meta.pkl) and data/shakespeare/prepare.py (GPT-2 BPE), each split 90/10 by
characters. trainer.data.prepare checks the options, stages the files and moves them into place;
this module turns the text into the files. Both writers call boundary() between pieces of work
(a chunk of characters, a split), which may raise to stop (a Ctrl-C: trainer.data.prepare).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.data.datasets import MIN_SPLIT_TOKENS, DataError
from trainer.data.tokenfiles import atomic_write, write_tokens
from trainer.errors import counted

TRAIN_SHARE = 0.9  # nanoGPT's prepare.py scripts: train = the first 90% of the characters


@dataclass
class Encoder:
    """A tokenizer: encode(text) -> token ids, and the end-of-text id put before documents."""
    name: str
    encode: Callable[[str], list[int]]
    eot: int


@dataclass
class Prepared:
    """What a prepare wrote: the folder, its files, tokens per split, and the vocab it declares."""
    out_dir: Path
    files: list[Path]
    tokens: dict[str, int] = field(default_factory=dict)
    vocab_size: int | None = None  # meta.pkl's, for the char-level set; None: GPT-2 BPE


def _split_text(text: str) -> tuple[str, str]:
    """(train, val): the first TRAIN_SHARE of the characters and the rest. Raises DataError where
    either part has fewer than MIN_SPLIT_TOKENS characters: a character is at most one token (one
    exactly for shakespeare_char), so no run could sample that split."""
    n = len(text)
    cut = int(n * TRAIN_SHARE)
    if min(cut, n - cut) < MIN_SPLIT_TOKENS:
        raise DataError(f"the text has {counted(n, 'character')}: too few for a train and a val split of "
                        f"{MIN_SPLIT_TOKENS} tokens or more each (they would get {cut} and {n - cut}; a run samples "
                        f"block_size + 1 tokens from each): give a text of at least {_fewest_characters()} characters")
    return text[:cut], text[cut:]


def _fewest_characters() -> int:
    """The shortest text whose train and val parts both hold MIN_SPLIT_TOKENS characters (11):
    counted up, since the split rounds down."""
    return next(n for n in range(MIN_SPLIT_TOKENS, 1 << 20)
                if min(int(n * TRAIN_SHARE), n - int(n * TRAIN_SHARE)) >= MIN_SPLIT_TOKENS)


def check_split_tokens(tokens: dict[str, int], how: str) -> None:
    """Refuse (DataError, one line) splits encoded into fewer than MIN_SPLIT_TOKENS tokens, before
    any is written; `how`: the encoding, for the line ('GPT-2 BPE')."""
    short = {split: n for split, n in tokens.items() if n < MIN_SPLIT_TOKENS}
    if short:
        said = " and ".join(f"the {split} split to {counted(n, 'token')}" for split, n in short.items())
        raise DataError(f"the text encodes ({how}) {said}: too few, a run samples block_size + 1 tokens "
                        f"({MIN_SPLIT_TOKENS} or more) from each split; give a longer text")


CHAR_CHUNK = 1 << 22  # characters encoded between two boundaries: ~0.05 s of numpy work each
CODE_POINTS = 0x110000  # Unicode's code space


def encode_chars(text: str, boundary: Callable[[], None] = lambda: None,
                 advance: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, list[str]]:
    """(ids as uint16, the vocabulary) of a character-level encoding as nanoGPT's: the vocabulary
    is sorted(set(text)) and a character's id is its index there. Two passes over chunks of
    CHAR_CHUNK characters (which characters occur, then each one's id through a table indexed by
    code point), with boundary() before each chunk, so a stop asked on a text of gigabytes is
    acted on within a chunk; advance(n) after each chunk of the second pass. Raises DataError past
    65536 distinct characters (uint16)."""
    def chunks():
        for i in range(0, len(text), CHAR_CHUNK):
            boundary()
            yield i, np.frombuffer(text[i:i + CHAR_CHUNK].encode("utf-32-le"), dtype="<u4")
    seen = np.zeros(CODE_POINTS, dtype=bool)
    for _, points in chunks():
        seen[points] = True
    vocab = np.flatnonzero(seen)  # sorted by code point, as sorted() sorts one-character strings
    if len(vocab) > np.iinfo(np.uint16).max + 1:
        raise DataError(f"the text has {len(vocab):,} distinct characters; uint16 tokens hold at most 65,536")
    table = np.zeros(CODE_POINTS, dtype=np.uint16)
    table[vocab] = np.arange(len(vocab))
    ids = np.empty(len(text), dtype=np.uint16)
    for i, points in chunks():
        ids[i:i + len(points)] = table[points]
        advance(len(points))
    return ids, [chr(int(c)) for c in vocab]


def write_chars(text: str, out_dir: Path, bar, boundary: Callable[[], None] = lambda: None) -> Prepared:
    """shakespeare_char's layout in out_dir: train.bin, val.bin (uint16) and meta.pkl. boundary()
    is called between chunks of the encoding (encode_chars) and between the files, and may raise
    to stop."""
    import pickle
    train, _ = _split_text(text)
    task = bar.add_task("encoding (characters)", total=len(text))
    ids, chars = encode_chars(text, boundary, lambda n: bar.advance(task, n))
    cut = len(train)  # one token per character: the split of the text is the split of the ids
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    write_tokens(out_dir / "train.bin", ids[:cut])
    boundary()
    write_tokens(out_dir / "val.bin", ids[cut:])
    atomic_write(out_dir / "meta.pkl", lambda f: pickle.dump(meta, f))
    return Prepared(out_dir, [out_dir / n for n in ("train.bin", "val.bin", "meta.pkl")],
                    {"train": cut, "val": len(ids) - cut}, vocab_size=len(chars))


def write_bpe(text: str, out_dir: Path, encoder: Encoder, bar, boundary: Callable[[], None] = lambda: None) -> Prepared:
    """shakespeare's layout in out_dir: each 90/10 part of the text encoded whole (a cut inside
    a part could change its tokens), as train.bin and val.bin (uint16), written once both are
    encoded. boundary() is called between the parts and may raise to stop. Raises DataError where
    a part encodes to fewer than MIN_SPLIT_TOKENS tokens (check_split_tokens)."""
    parts = dict(zip(("train", "val"), _split_text(text)))
    task = bar.add_task(f"encoding with {encoder.name} BPE (characters)", total=len(text))
    ids = {}
    for split, part in parts.items():
        if split != "train":
            boundary()
        ids[split] = np.asarray(encoder.encode(part), dtype=np.int64)
        bar.advance(task, len(part))
    tokens = {split: len(a) for split, a in ids.items()}
    check_split_tokens(tokens, f"{encoder.name} BPE")  # both encoded, none written: a split too short is refused whole
    for split, a in ids.items():
        write_tokens(out_dir / f"{split}.bin", a)
    return Prepared(out_dir, [out_dir / "train.bin", out_dir / "val.bin"], tokens)
