"""A nanoGPT user's workflow through `autofit run`: resume a checkpoint in nanoGPT's own layout,
init_from GPT-2 weights, eval_only, wandb logging, and a resume that would change the run."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from autofit.cli.app import main  # noqa: F401
from cli_run import cli
from trainer.checkpoint.nanogpt import MODEL_ARGS

TINY = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
        "--set", "batch_size=4", "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1",
        "--set", "eval_interval=100", "--set", "log_interval=1", "--set", "max_iters=8"]
CPU = ["--device", "cpu", "--budget", "64MiB", "--no-progress"]




def records(out, kind=None):
    recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r["type"] == kind]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def as_nanogpt(ckpt_path: Path, compiled=True) -> None:
    """Rewrite an autofit ckpt.pt in nanoGPT train.py's own layout: six keys, `_orig_mod.` names."""
    ck = torch.load(ckpt_path, weights_only=True)
    cfg = ck["config"]
    nano_config = {k: cfg[k] for k in ("dataset", "batch_size", "gradient_accumulation_steps", "block_size",
                                       "learning_rate", "max_iters", "min_lr", "warmup_iters", "lr_decay_iters",
                                       "eval_interval", "eval_iters", "log_interval", "dtype", "device")}
    nano_config.update(compile=False, init_from="scratch", wandb_log=False, out_dir=cfg["out_dir"])
    torch.save({"model": {("_orig_mod." if compiled else "") + k: v for k, v in ck["model"].items()},
                "optimizer": ck["optimizer"], "model_args": {k: cfg[k] for k in MODEL_ARGS},
                "iter_num": ck["iter_num"], "best_val_loss": torch.tensor(ck["best_val_loss"]),
                "config": nano_config}, ckpt_path)


def test_autofits_checkpoint_is_nanogpts_too_and_a_nanogpt_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "4", "--out", "run")
    assert code == 0, err
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert set(ck["model_args"]) == set(MODEL_ARGS)  # nanoGPT's sample.py: GPTConfig(**model_args)
    as_nanogpt(tmp_path / "run" / "ckpt.pt")
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "run", *CPU)
    assert code == 0, err
    assert "nanoGPT checkpoint (step 4)" in err and "not restored: data position" in err
    # t5's L4 (session 14): the plan probed now is shown as a fresh run shows it, not only where it came from
    plan = out.split("plan: probed just now on ")[1].splitlines()[1]
    assert plan.startswith("  ") and ", loss " in plan and " budget" in plan, out
    (ev,) = [r for r in records(tmp_path / "run", "event") if r["event"] == "resume_partial"]
    assert any("RNG" in item for item in ev["not_restored"])
    steps = [r["step"] for r in records(tmp_path / "run", "train")]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7]  # continued at its iteration
    back = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert back["iter_num"] == 8 and "sampler" in back  # now in autofit's layout (and nanoGPT's keys)
    # its AdamW state went on from the nanoGPT one: 8 steps counted, not 4
    assert int(next(iter(back["optimizer"]["state"].values()))["step"]) == 8


def test_init_from_resume_in_a_config_is_resume(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "r")
    assert code == 0, err
    (tmp_path / "c.py").write_text("init_from = 'resume'\nout_dir = 'r'\nmax_iters = 3\n")
    code, out, err = cli(monkeypatch, capsys, "run", "--config", "c.py", *CPU)
    assert code == 0, err
    assert [r["step"] for r in records(tmp_path / "r", "train")] == [0, 1, 2]


def test_a_resume_config_device_is_refused_only_when_it_differs(tmp_path, monkeypatch, capsys):
    """r1 (session 13): a config naming the checkpoint's own device was said as 'not the config's
    device', and a different one twice, once as a '--set device' the user never gave. t5's M3
    (session 14): a different one is refused in one line, as --device is (it was said and ignored)."""
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", "--device", "cpu", *TINY, "--max-steps", "2",
                       "--out", "r", "--no-progress")
    assert code == 0, err
    (tmp_path / "c.py").write_text("init_from = 'resume'\nout_dir = 'r'\nmax_iters = 3\ndevice = 'cpu'\n")
    code, _, err = cli(monkeypatch, capsys, "run", "--config", "c.py", "--no-progress")
    assert code == 0 and "device" not in err, err
    (tmp_path / "c.py").write_text("init_from = 'resume'\nout_dir = 'r'\nmax_iters = 4\ndevice = 'cuda'\n")
    code, _, err = cli(monkeypatch, capsys, "run", "--config", "c.py", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the config's device 'cuda' with --resume: an autofit checkpoint goes on on the device it trained on (cpu)" \
        in " ".join(err.split()) and "drop device from the config" in err, err



def test_a_finished_run_says_what_to_do_next_and_both_commands_work(tmp_path, monkeypatch, capsys):
    import shlex
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--out", "my run")
    assert code == 0, err
    (nxt,) = [ln for ln in out.splitlines() if ln.startswith("next: ")]
    sample, resume = [part.split(" (")[0] for part in nxt.removeprefix("next: ").split(", or ")]
    code, out, err = cli(monkeypatch, capsys, *shlex.split(sample)[1:], "--num-samples", "1", "--max-new-tokens", "4")
    assert code == 0 and out.strip(), err
    code, out, err = cli(monkeypatch, capsys, *shlex.split(resume.replace("max_iters=N", "max_iters=10"))[1:],
                         "--no-progress")
    assert code == 0, err
    assert [r["step"] for r in records(tmp_path / "my run", "train")][-1] == 9


def test_a_resume_refuses_to_change_what_is_trained(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "r")
    assert code == 0, err
    before = (tmp_path / "r" / "ckpt.pt").read_bytes()
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--set", "gradient_accumulation_steps=4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "effective batch 8 -> 16" in err
    assert (tmp_path / "r" / "ckpt.pt").read_bytes() == before
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--set", "learning_rate=0.01")
    assert code == 2 and "learning_rate" in err
    # --resume and a fresh start at once: init_from=scratch was dropped without a word
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--set", "init_from=scratch")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--resume continues the checkpoint's model; --set init_from=scratch starts another: drop one" in err
    # a value of the wrong type names where it was set, as in a fresh run
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--set", "max_iters=True")
    assert code == 2 and "max_iters=True (--set): must be an integer, not a bool" in err
    (tmp_path / "c.py").write_text("init_from = 'resume'\nout_dir = 'r'\nmax_iters = 2.5\n")
    code, _, err = cli(monkeypatch, capsys, "run", "--config", "c.py")
    assert code == 2 and "max_iters=2.5 (c.py:3): must be an integer, not a float" in err, err
    # what does not change the run is fine: a longer run, another log interval
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--no-progress", "--set", "max_iters=4",
                       "--max-steps", "3")
    assert code == 0, err
    # and a change is possible when asked for, and recorded
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--no-progress", "--allow-changes",
                       "--set", "learning_rate=0.01", "--set", "max_iters=4")
    assert code == 0, err
    assert "learning_rate" in err
    last_run = records(tmp_path / "r", "run")[-1]
    assert any("learning_rate" in c for c in last_run["plan"]["changes"])



@pytest.mark.parametrize("allow", [[], ["--allow-changes"]])
def test_a_resume_refuses_a_model_shape_change_by_name_even_with_allow_changes(tmp_path, monkeypatch, capsys, allow):
    """n_head 2 -> 6 alone would fail on n_embd 32; the refusal names the shape change itself."""
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "r")
    assert code == 0, err
    before = (tmp_path / "r" / "ckpt.pt").read_bytes()
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", *allow, "--set", "n_head=6",
                       "--set", "n_layer=2")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "shape cannot change" in err and "n_head 2 -> 6" in err and "n_layer 1 -> 2" in err
    assert "divisible" not in err
    assert (tmp_path / "r" / "ckpt.pt").read_bytes() == before
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--set", "n_layers=2")
    assert code == 2 and "unknown key 'n_layers' (did you mean 'n_layer'?)" in err


@pytest.mark.parametrize("change,words", [("mlp=relu2", "mlp 'gelu' -> 'relu2'"),
                                          ("optimizer=muon", "optimizer 'adamw' -> 'muon'"),
                                          ("n_kv_head=1", "n_kv_head None -> 1")])
def test_a_resume_refuses_an_architecture_or_optimizer_change_even_with_allow_changes(tmp_path, monkeypatch,
                                                                                    capsys, change, words):
    """The checkpoint's weights and optimizer state load only into the same architecture and
    optimizer: refused by name before anything loads (it was a KeyError traceback for the optimizer
    and 'checkpoint has mlp=...' after the plan for the architecture)."""
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "r")
    assert code == 0, err
    before = (tmp_path / "r" / "ckpt.pt").read_bytes()
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--allow-changes", "--set", change)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot change" in err and words in err and "plan:" not in out
    assert (tmp_path / "r" / "ckpt.pt").read_bytes() == before


def test_a_resume_may_change_activation_checkpointing(tmp_path, monkeypatch, capsys):
    """Recomputation gives the same values (same RNG state): not a change of what is trained."""
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "r")
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--no-probe", "--max-steps", "3",
                       "--set", "checkpointing=1", "--set", "checkpointing_policy=selective")
    assert code == 0, err


def test_eval_only_evaluates_and_exits(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, *TINY, "--set", "eval_only=True", "--out", "e")
    assert code == 0, err
    assert "evaluated (eval_only) at step 0" in out
    # it says it evaluates, not that it trains, and where its losses went
    assert "evaluating on cpu" in err + out and "training on" not in err + out
    assert f"the losses are in {Path('e') / 'metrics.jsonl'}" in out
    assert not (tmp_path / "e" / "ckpt.pt").exists()
    assert records(tmp_path / "e", "train") == [] and len(records(tmp_path / "e", "eval")) == 1


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return object()

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1


def test_wandb_gets_the_metrics_records(tmp_path, monkeypatch, capsys):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "3", "--out", "w",
                       "--set", "wandb_log=True", "--set", "wandb_project=p", "--set", "wandb_run_name=n")
    assert code == 0, err
    assert fake.inits[0]["project"] == "p" and fake.inits[0]["name"] == "n" and fake.finished == 1
    train_steps = [step for step, d in fake.logged if "train/loss" in d]
    assert train_steps == [r["step"] for r in records(tmp_path / "w", "train")]
    losses = {step: d["train/loss"] for step, d in fake.logged if "train/loss" in d}
    assert losses == {r["step"]: r["loss"] for r in records(tmp_path / "w", "train")}


def test_without_wandb_installed_one_line_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "w",
                         "--set", "wandb_log=True")
    assert code == 0, err
    assert "wandb is not installed" in out + err and 'pip install -e ".[wandb]"' in out + err
    assert len(records(tmp_path / "w", "train")) == 2


def test_init_from_gpt2_starts_from_the_weights(tmp_path, monkeypatch, capsys):
    """A tiny GPT-2-format checkpoint stands in for the published one (no network here)."""
    import trainer.model.pretrained as pretrained
    from tests.test_pretrained import hf_config, hf_tensors, write_tiny_gpt2
    src = write_tiny_gpt2(tmp_path / "tiny-gpt2", hf_tensors(vocab_size=256), hf_config(vocab_size=256))
    real = pretrained.load_gpt2
    monkeypatch.setitem(pretrained.GPT2_MODELS, "gpt2", dict(n_layer=2, n_head=2, n_embd=32))
    monkeypatch.setattr(pretrained, "GPT2_VOCAB", 256)  # byte tokens: the built-in corpus
    monkeypatch.setattr(pretrained, "load_gpt2", lambda model_type, **kw: real(None, source=src, **kw))
    monkeypatch.setattr(pretrained, "locate_gpt2", lambda model_type: (src / "config.json", src / "model.safetensors"))
    tiny = pretrained.load_gpt2("gpt2").model
    code, out, err = cli(monkeypatch, capsys, "config", "--set", "init_from=gpt2", "--set", "block_size=16", "--json")
    shape = json.loads(out)
    assert (shape["n_layer"], shape["n_embd"], shape["bias"], shape["block_size"]) == (2, 32, True, 16)
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, "--set", "init_from=gpt2", "--set", "block_size=16",
                         "--set", "batch_size=2", "--set", "gradient_accumulation_steps=1", "--set", "eval_only=True",
                         "--set", "eval_iters=2", "--out", "g")
    assert code == 0, err
    assert "init_from gpt2: weights of gpt2" in out + err
    # the evaluation is of the published weights: a fresh model scores ~log(vocab), these do not
    val = records(tmp_path / "g", "eval")[0]["val_loss"]
    fresh = torch.log(torch.tensor(float(tiny.config.vocab_size))).item()
    assert abs(val - fresh) > 0.05


def test_gpt2_weights_that_cannot_be_had_stop_the_run_before_the_probe(tmp_path, monkeypatch, capsys):
    """init_from = 'gpt2' offline with nothing cached: one line before any trial (the probe of a
    GPT-2 took minutes before the weights were looked for)."""
    import trainer.model.pretrained as pretrained

    def offline(model_type):
        raise pretrained.WeightsError(f"openai-community/{model_type} is not in the Hugging Face cache and "
                                      f"HF_HUB_OFFLINE is set")
    monkeypatch.setattr(pretrained, "_from_hub", offline)
    code, out, err = cli(monkeypatch, capsys, "run", "--device", "cpu", "--budget", "1MiB", "--set", "init_from=gpt2",
                         "--set", "block_size=16", "--out", "g")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "is not in the Hugging Face cache" in err and "trial:" not in err
    assert not (tmp_path / "g" / "metrics.jsonl").exists()


def test_a_nanogpt_users_path_end_to_end(tmp_path, monkeypatch, capsys):
    """prepare shakespeare_char from a local text, train from a nanoGPT-style config with no
    vocab_size, resume that checkpoint written in nanoGPT's own layout, sample from it, and load a
    tiny GPT-2-format checkpoint: all through the CLI, offline."""
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 400)
    (tmp_path / "input.txt").write_text(text)
    code, _, err = cli(monkeypatch, capsys, "data", "prepare", "shakespeare_char", "--input", "input.txt",
                       "--no-progress")
    assert code == 0, err
    (tmp_path / "train_shakespeare_char.py").write_text(
        "out_dir = 'out-shakespeare-char'\neval_interval = 4\neval_iters = 2\nlog_interval = 1\n"
        "always_save_checkpoint = False\ndataset = 'shakespeare_char'\ngradient_accumulation_steps = 1\n"
        "batch_size = 8\nblock_size = 32\nn_layer = 1\nn_head = 2\nn_embd = 32\ndropout = 0.0\n"
        "learning_rate = 1e-3\nmax_iters = 8\nlr_decay_iters = 8\nmin_lr = 1e-4\nbeta2 = 0.99\n"
        "warmup_iters = 2\ncompile = False\n")
    code, out, err = cli(monkeypatch, capsys, "run", "--config", "train_shakespeare_char.py", *CPU, "--max-steps", "4")
    assert code == 0, err
    assert "vocab_size" in err and "meta.pkl" in err  # said where the vocab came from
    run = tmp_path / "out-shakespeare-char"
    n_chars = len(set(text))
    assert torch.load(run / "ckpt.pt", weights_only=True)["model_args"]["vocab_size"] == n_chars
    as_nanogpt(run / "ckpt.pt")
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", str(run), *CPU)
    assert code == 0, err
    assert [r["step"] for r in records(run, "train")] == list(range(8))
    code, out, err = cli(monkeypatch, capsys, "sample", "--out", str(run), "--start", "First", "--num-samples", "2",
                         "--max-new-tokens", "20", "--device", "cpu", "--json")
    assert code == 0, err
    samples = json.loads(out)["samples"] if isinstance(json.loads(out), dict) else json.loads(out)
    assert len(samples) == 2 and all(s.startswith("First") and set(s) <= set(text) for s in samples)
    from tests.test_pretrained import write_tiny_gpt2
    src = write_tiny_gpt2(tmp_path / "tiny-gpt2")
    code, out, err = cli(monkeypatch, capsys, "sample", "--init-from", str(src), "--start", "FILE:input.txt",
                         "--num-samples", "1", "--max-new-tokens", "3", "--device", "cpu", "--json")
    # GPT-2's BPE (tiktoken's encoding file) needs a download: offline, one line about it and
    # nothing else; with it cached, samples. Either way the weights loaded without a traceback.
    assert (code == 0 and json.loads(out)) or (code == 2 and len(err.strip().splitlines()) == 1
                                               and ("tiktoken" in err or "encoding" in err)), err


def test_tensorboard_gets_the_metrics_records(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "3", "--out", "t",
                       "--set", "tensorboard_dir=tb/run1")
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "tb" / "run1"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    want = {r["step"]: r["loss"] for r in records(tmp_path / "t", "train")}
    assert sorted(losses) == sorted(want) == [0, 1, 2]
    assert all(abs(losses[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want)  # float32 in the event file
    assert "eval/val_loss" in events.Tags()["scalars"]  # evaluation at step 0


def test_without_tensorboard_installed_one_line_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "t",
                         "--set", "tensorboard_dir=tb")
    assert code == 0, err
    assert "tensorboard is not installed" in out + err and 'pip install -e ".[tensorboard]"' in out + err
    assert len(records(tmp_path / "t", "train")) == 2 and not (tmp_path / "tb").exists()


def test_an_unwritable_tensorboard_dir_is_one_line_before_the_probe(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, *TINY, "--out", "t", "--set", "tensorboard_dir=afile/tb")
    assert code != 0
    assert "tensorboard_dir afile/tb" in err and "is a file" in err and "Traceback" not in err
    assert "trial" not in out + err  # refused before the probe ran


def test_a_resume_may_start_logging_to_tensorboard(tmp_path, monkeypatch, capsys):
    """Logging is not what is trained: a resume may add tensorboard_dir without --allow-changes."""
    pytest.importorskip("tensorboard")
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "r")
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--max-steps", "4",
                       "--set", "tensorboard_dir=tb", "--no-progress")
    assert code == 0, err
    assert [r["step"] for r in records(tmp_path / "r", "train")] == [0, 1, 2, 3]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_resume_whose_tensorboard_dir_is_now_a_file_leaves_metrics_as_they_were(tmp_path, monkeypatch, capsys):
    """The checkpoint's own tensorboard_dir is read only at the resume: it was refused after a 'run'
    record had been appended to metrics.jsonl (a run that never ran), with torch's 'File exists'."""
    pytest.importorskip("tensorboard")
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "1", "--out", "r",
                       "--set", "tensorboard_dir=tb")
    assert code == 0, err
    shutil.rmtree(tmp_path / "tb")
    (tmp_path / "tb").write_text("x")
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--max-steps", "2", "--no-progress")
    assert code == 2 and err.strip().splitlines()[-1] == "autofit: error: tensorboard_dir tb: tb is a file, not a folder"
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_a_nanogpt_checkpoint_without_optimizer_state_is_primed_before_its_first_update(tmp_path, monkeypatch,
                                                                                        capsys):
    """A resume was taken as primed: with no optimizer state in the checkpoint, AdamW's state was
    made inside the first update, where an out-of-memory error stops the run instead of a redo."""
    import trainer.redo as redo
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "run")
    assert code == 0, err
    as_nanogpt(tmp_path / "run" / "ckpt.pt")
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    del ck["optimizer"]
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    primed, real = [], redo.prime_optimizer
    monkeypatch.setattr(redo, "prime_optimizer", lambda m, opt, **k: (primed.append(len(opt.state)),
                                                                      real(m, opt, **k)))
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "run", *CPU, "--max-steps", "3")
    assert code == 0, err
    assert primed == [0]  # once, before the first update, with no state yet


def test_a_run_cut_short_by_max_steps_says_how_to_go_on_and_the_command_reaches_max_iters(tmp_path, monkeypatch,
                                                                                          capsys):
    """--max-steps stops before max_iters: the printed resume trains on to max_iters (a plain
    --resume; `--set max_iters=N` would change the schedule of a run that has not reached it)."""
    import shlex
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--set", "max_iters=4",
                         "--max-steps", "2", "--out", "r")
    assert code == 0, err
    (nxt,) = [ln for ln in out.splitlines() if ln.startswith("next: ")]
    assert "(train on to max_iters 4; --max-steps N to stop at step N)" in nxt and "max_iters=N" not in nxt, nxt
    resume = nxt.removeprefix("next: ").split(", or ")[1].split(" (")[0]
    code, out, err = cli(monkeypatch, capsys, *shlex.split(resume)[1:], "--no-progress")
    assert code == 0, err
    assert [r["step"] for r in records(tmp_path / "r", "train")] == [0, 1, 2, 3]


def test_the_line_after_an_interrupt_repeats_max_steps(tmp_path, capsys):
    """Ctrl-C of `run --max-steps 300`: the continuation printed dropped --max-steps, and following
    it trained on toward max_iters (20,000 for a preset), not to the step asked for."""
    import typer
    from autofit.cli.run_end import report_run
    from trainer.options import RunResult
    cfg = types.SimpleNamespace(out_dir=str(tmp_path / "my out"), max_iters=20_000)
    res = RunResult(steps=67, losses=[1.0], tokens=0, micro_batches=[4], status="interrupted", events=[],
                    checkpoint=tmp_path / "my out" / "ckpt.pt", checkpoint_step=67)
    for max_steps, tail in ((300, " --max-steps 300"), (None, ""), (20_000, ""), (30_000, "")):
        with pytest.raises(typer.Exit):
            report_run(res, cfg, max_steps)
        err = capsys.readouterr().err
        assert err.rstrip().endswith(f"continue with: autofit run --resume --out '{tmp_path}/my out'{tail}"), err


def test_a_resume_on_a_dataset_prepared_again_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    """`data prepare --force` rewrote the dataset under a checkpoint: the resume trained on in
    silence on other batches and, for characters, other token ids (another alphabet)."""
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    prep = ["data", "prepare", "shakespeare_char", "--input", "a.txt", "--out", "data/sc", "--no-progress"]
    code, _, err = cli(monkeypatch, capsys, *prep)
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--set", "dataset=sc", "--max-steps", "2",
                       "--out", "r")
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--no-progress", "--max-steps", "3")
    assert code == 0, err  # the same data: no word
    assert "not the data" not in err
    (tmp_path / "a.txt").write_text("abc" * 3000)
    code, _, err = cli(monkeypatch, capsys, *prep, "--force")
    assert code == 0, err
    before = (tmp_path / "r" / "ckpt.pt").stat().st_mtime_ns
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--no-progress", "--max-steps", "4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and out == "", err
    assert "dataset 'sc' is not the data r/ckpt.pt trained on (train:" in err and "--allow-changes" in err
    assert (tmp_path / "r" / "ckpt.pt").stat().st_mtime_ns == before
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "r", "--no-progress", "--max-steps", "4",
                       "--allow-changes")
    assert code == 0 and "--resume with --allow-changes: dataset 'sc' is not the data it trained on" in err, err
    (first,) = [r for r in records(tmp_path / "r", "run") if (r.get("plan") or {}).get("changes")] or [None]
    assert first is not None and any(c.startswith("dataset 'sc' prepared again (train:") for c in first["plan"]["changes"])


def test_the_done_line_counts_one_step_as_one(monkeypatch):
    """'done: 1 optimizer steps (steps 40 to 40; 41 in all)'."""
    from autofit.cli import run_end
    from trainer.config.train_config import load_config
    from trainer.options import RunResult
    cfg = load_config(preset="tiny", overrides=["max_iters=41", "out_dir=o"])
    lines = []
    monkeypatch.setattr(run_end.console, "print", lambda s, **k: lines.append(s))
    for steps in (41, 1):
        run_end.report_run(RunResult(steps=steps, losses=[2.0], tokens=0, micro_batches=[1], status="finished",
                                     events=[], checkpoint="o/ckpt.pt", checkpoint_step=steps), cfg)
    assert lines[0].startswith("done: 1 optimizer step (step 40; 41 in all), loss 2.000 -> 2.000"), lines
    assert lines[2].startswith("done: 1 optimizer step, loss"), lines


def test_a_nanogpt_bf16_checkpoint_resumed_on_the_cpu_says_nanogpt_ran_it_in_float32(tmp_path, monkeypatch, capsys):
    """nanoGPT's CPU path runs no autocast, so its dtype='bfloat16' configs train in float32 there;
    the resume kept bfloat16 (12x slower on this CPU) without a word."""
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "run")
    assert code == 0, err
    as_nanogpt(tmp_path / "run" / "ckpt.pt")
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    ck["config"]["dtype"] = "bfloat16"
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "run", *CPU, "--max-steps", "3",
                         "--checkpointing", "0", "--loss", "standard")
    assert code == 0, err
    assert "dtype 'bfloat16' from the checkpoint's config: nanoGPT trains on the CPU in float32" in err, err


def test_a_nanogpt_checkpoint_trained_on_cuda_says_where_it_trains_without_cuda(tmp_path, monkeypatch, capsys):
    """t5's M3 (session 14): a GPU-trained nanoGPT ckpt.pt (config device='cuda') resumed here
    trained on the CPU without a word, and a --set device=cuda was dropped too; the checkpoint's
    'cuda' is said (one line: where it trains and why), the user's --set is opened as a fresh run's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--max-steps", "2", "--out", "run")
    assert code == 0, err
    as_nanogpt(tmp_path / "run" / "ckpt.pt")
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    ck["config"]["device"] = "cuda"
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "run", "--max-steps", "3", "--no-progress",
                       "--set", "device=cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cuda" in err.lower(), err
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "run", "--max-steps", "3", "--no-progress",
                         "--checkpointing", "0", "--loss", "standard", "--dtype", "float32")
    assert code == 0, err
    said = [line for line in " ".join(err.split()).split("device 'cuda'")[1:]]
    assert len(said) == 1 and said[0].startswith(" from the checkpoint's config (where nanoGPT trained it): this "
                                                 "machine has no CUDA GPU, so this run trains on the CPU"), err


def test_a_home_folder_written_after_an_equals_sign_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """`data prepare --out=~/data/sc` (no shell expands '~' after '=') made a folder named '~' here,
    and the printed `--set dataset=~/data/sc` then named another; `sample --out '~/r'` read './~/r'."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    code, out, err = cli(monkeypatch, capsys, "data", "prepare", "shakespeare_char", "--input", "a.txt",
                         "--out=~/data/sc", "--no-progress")
    assert code == 0 and (tmp_path / "home" / "data" / "sc" / "meta.pkl").exists(), err
    use = out.split("--set dataset=")[1].split(")")[0]
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--set", f"dataset={use}",
                       "--max-steps", "1", "--out", "~/r")
    assert code == 0 and (tmp_path / "home" / "r" / "ckpt.pt").exists(), err
    code, out, err = cli(monkeypatch, capsys, "sample", "--out", "~/r", "--device", "cpu", "--num-samples", "1",
                         "--max-new-tokens", "4", "--start", "the")
    assert code == 0, err
    assert not (tmp_path / "~").exists()


def test_the_continuation_of_a_run_on_several_ranks_keeps_them(tmp_path, capsys, monkeypatch):
    """After a `--nproc-per-node 2` run, the printed continue and next commands resumed on one rank."""
    import typer
    from autofit.cli.run_end import report_run
    from trainer.config.train_config import load_config
    from trainer.options import RunResult
    cfg = load_config(preset="tiny", overrides=["max_iters=500", f"out_dir={tmp_path / 'o'}"])
    stopped = RunResult(steps=67, losses=[1.0], tokens=0, micro_batches=[4], status="interrupted", events=[],
                        checkpoint=tmp_path / "o" / "ckpt.pt", checkpoint_step=67)
    done = RunResult(steps=300, losses=[1.0], tokens=0, micro_batches=[4], status="finished", events=[],
                     checkpoint=tmp_path / "o" / "ckpt.pt", checkpoint_step=300)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for launcher, tail in (("4242", " --nproc-per-node 2"), (None, "")):  # a torchrun of your own: yours to repeat
        if launcher:
            monkeypatch.setenv("AUTOFIT_LAUNCHER", launcher)
        else:
            monkeypatch.delenv("AUTOFIT_LAUNCHER", raising=False)
        with pytest.raises(typer.Exit):
            report_run(stopped, cfg, 300)
        assert capsys.readouterr().err.rstrip().endswith(f"--max-steps 300{tail}")
        report_run(done, cfg, 300)
        nxt = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("next:")][0]
        assert f"autofit run --resume --out {tmp_path / 'o'}{tail} (train on to max_iters 500" in nxt, nxt


def test_the_interrupt_line_after_a_resume_counts_this_process_steps(monkeypatch):
    """A resumed run interrupted at step 26 trained 23 steps here; it said 'after 26 optimizer step(s)'."""
    import typer
    from autofit.cli import run_end
    from trainer.config.train_config import load_config
    from trainer.options import RunResult
    cfg = load_config(preset="tiny", overrides=["max_iters=100", "out_dir=o"])
    lines = []
    monkeypatch.setattr(run_end.err_console, "print", lambda s, **k: lines.append(s))
    monkeypatch.setattr(run_end.interrupts, "tell_launcher", lambda: None)
    for losses in ([2.0] * 23, [], [2.0] * 26):
        with pytest.raises(typer.Exit):
            run_end.report_run(RunResult(steps=26, losses=losses, tokens=0, micro_batches=[1], status="interrupted",
                                         events=[], checkpoint="o/ckpt.pt", checkpoint_step=26), cfg)
    assert lines[0].startswith("interrupted after 23 optimizer steps (steps 3 to 25; 26 in all); checkpoint o/ckpt.pt "
                               "resumes at step 26"), lines
    assert lines[1].startswith("interrupted after 0 optimizer steps (26 in all);"), lines
    assert lines[2].startswith("interrupted after 26 optimizer steps;"), lines
