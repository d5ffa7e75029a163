"""`autofit data prepare` and `autofit sample`: datasets in nanoGPT's layout, and text from a
checkpoint as nanoGPT's sample.py writes it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from autofit import interrupts
from autofit.cli.common import console, err_console
from trainer.errors import counted

sample_app = typer.Typer()
@sample_app.command("sample")
def sample_cmd(out: Path = typer.Option(Path("out"), "--out", help="Run directory holding ckpt.pt (autofit's or nanoGPT's), or the file itself."),
               start: str = typer.Option("\n", "--start", show_default=False, help="Prompt text, or FILE:path to read it from a file (default a newline, as sample.py; id 0 where the vocabulary has none)."),
               num_samples: int = typer.Option(10, "--num-samples", help="Samples to draw."),
               max_new_tokens: int = typer.Option(500, "--max-new-tokens", help="Tokens generated per sample."),
               temperature: float = typer.Option(0.8, "--temperature", help="> 0; below 1 sharper, above 1 more random."),
               top_k: int = typer.Option(200, "--top-k", help="Sample from the K most likely tokens (>= 1)."),
               seed: int = typer.Option(1337, "--seed", help="Random seed (torch.manual_seed), as sample.py's."),
               device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if there is a GPU)."),
               init_from: str = typer.Option("resume", "--init-from", help="resume (from --out), gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a directory with a GPT-2 model.safetensors + config.json."),
               as_json: bool = typer.Option(False, "--json", help="Print only JSON.")):
    """Sample text from a checkpoint, as nanoGPT's sample.py."""
    from trainer.paths import expand_user
    from trainer.sample import SampleOptions, generate_samples
    out = expand_user(out)  # '~/runs/x' quoted, or --out=~/x (no shell expands it): as run --out does
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = SampleOptions(start=start, num_samples=num_samples, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, seed=seed, device=device, init_from=init_from)
    if as_json:
        interrupts.during("interrupted while sampling; nothing was printed (--json prints all samples at the end)")
        res = generate_samples(out, opts)
        print(json.dumps({"samples": res.texts, "model": res.model_source, "codec": res.codec,
                          "device": res.device, "dtype": res.dtype, "prompt_tokens": res.prompt_tokens}, indent=2))
        return

    shown = []

    def show(text: str) -> None:  # plain print, as soon as drawn: generated text is not rich markup
        print(text, "---------------", sep="\n", flush=True)
        shown.append(text)

    # asked at the Ctrl-C: 'printed above' was said before any sample had ended (t3, session 12)
    interrupts.during(lambda: f"interrupted while sampling; {len(shown)} of {counted(num_samples, 'sample')} finished and "
                              f"printed above" if shown else "interrupted while sampling; no sample had finished, "
                              "nothing was printed")
    generate_samples(out, opts, on_sample=show, say=lambda line: err_console.print(f"[dim]{line}[/]", soft_wrap=True))


data_app = typer.Typer(help="Datasets in nanoGPT's layout: prepare them.", no_args_is_help=True)


@data_app.command("prepare")
def data_prepare(name: str = typer.Argument(..., help="shakespeare_char, shakespeare or fineweb-edu."),
                 out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: data/NAME, where dataset = 'NAME' looks)."),
                 input_file: Optional[Path] = typer.Option(None, "--input", help="A local text instead of the download (fineweb-edu: a .jsonl of {\"text\": ...} rows, or one text)."),
                 max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="fineweb-edu: stop after this many tokens (default: the whole ~10B-token sample)."),
                 shard_size: Optional[int] = typer.Option(None, "--shard-size", help="fineweb-edu: tokens per llm.c shard (default 100,000,000)."),
                 force: bool = typer.Option(False, "--force", help="Replace a dataset already in --out."),
                 no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (and no line per shard written).")):
    """Write a dataset as nanoGPT lays it out: train.bin/val.bin (+ meta.pkl), or llm.c shards.

    A Ctrl-C/SIGTERM stops at the next boundary (a document, a shard, 4M characters of a text);
    fineweb-edu keeps its finished shards and the same command, run again, continues from them."""
    from trainer.data.prepare import PrepareStopped, prepare
    from trainer.paths import expand_user
    # --out=~/data/sc: a shell expands no '~' after '=', and a folder named '~' here invites `rm -rf ~`
    out_dir = expand_user(out) if out is not None else Path("data") / name
    log = lambda s: err_console.print(f"[dim]{s}[/]")
    interrupts.during(f"interrupted while preparing {name}; nothing was moved into {out_dir}")
    try:
        done = prepare(name, out_dir, input_path=input_file, max_tokens=max_tokens, shard_size=shard_size,
                       force=force, progress=not no_progress, log=log)
    except PrepareStopped as e:  # a Ctrl-C/SIGTERM, acted on at a boundary: what is kept, how to go on
        interrupts.said()
        err_console.print(f"autofit: {e}", markup=False, soft_wrap=True)  # as every stop line reads
        raise typer.Exit(interrupts.exit_code()) from None  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
    counts = ", ".join(f"{split} {n:,} {'token' if n == 1 else 'tokens'}" for split, n in done.tokens.items())
    vocab = f", vocab_size {done.vocab_size} in meta.pkl" if done.vocab_size else ", GPT-2 BPE tokens"
    use = name if out_dir == Path("data") / name else str(out_dir)
    console.print(f"wrote {out_dir} ({counts}{vocab}); train on it with dataset = '{use}' "
                  f"(--set dataset={use})", soft_wrap=True)
    if note := _small_split_note(done.tokens):
        err_console.print(note, markup=False, soft_wrap=True)


# A split with fewer tokens than this is said to be small: a run samples block_size + 1 tokens from
# each split, and the smallest block_size of the presets is the tiny one's, 128
SMALL_SPLIT_TOKENS = 129


def _small_split_note(tokens: dict[str, int]) -> str | None:
    """A note where a split is too short for the presets' runs (t9's L4); None otherwise. A split
    too short for any run (under trainer.data.datasets.MIN_SPLIT_TOKENS) is refused before it is
    written (t11's M2), so every split here allows some block_size."""
    split, n = min(tokens.items(), key=lambda kv: kv[1]) if tokens else ("", SMALL_SPLIT_TOKENS)
    if n >= SMALL_SPLIT_TOKENS:
        return None
    fits = f"block_size at most {n - 1:,}"
    short = [s for s, k in tokens.items() if k < SMALL_SPLIT_TOKENS]
    which = f"the {split} split has" if len(short) == 1 else f"the {' and '.join(short)} splits have as few as"  # t10's L6
    return (f"note: {which} {n:,} {'token' if n == 1 else 'tokens'}; a run samples block_size + 1 "
            f"tokens from each split, so it allows {fits}: give a longer text")


