"""Steps at learning rate 0 (min_lr 0 and max_iters past lr_decay_iters, nanoGPT's schedule): a new
run says how many before training (t11's M3: half a run trained at 0 without a word), a resume into
them alone is refused, and both say why in the same words (trainer.schedule.zero_lr_words)."""
import itertools
import json
from types import SimpleNamespace

from cli_run import cli

from autofit.launch.checks import say_config_notes
from trainer.config.train_config import load_config
from trainer.schedule import at_zero_lr_from, first_zero_lr_step, lr_at

SMALL = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
         "--set", "batch_size=4", "--set", "gradient_accumulation_steps=1", "--set", "eval_iters=1",
         "--set", "eval_interval=100", "--set", "log_interval=1"]


def test_the_first_step_at_learning_rate_0_is_where_lr_at_stays_0():
    """Every warm-up and decay length up to 5, against lr_at itself: with warmup_iters ==
    lr_decay_iters that step runs at learning_rate (the ratio is 0 there), so 0 starts a step later;
    it was taken for 0, and a resume at that step refused as having nothing to train."""
    for warmup, decay in itertools.product(range(6), range(6)):
        cfg = SimpleNamespace(decay_lr=True, min_lr=0.0, learning_rate=1e-3, warmup_iters=warmup, lr_decay_iters=decay)
        rates = [lr_at(i, cfg) for i in range(16)]
        first = next(i for i in range(16) if not any(rates[i:]))
        assert first_zero_lr_step(cfg) == first, (warmup, decay, rates[:8])
        assert [at_zero_lr_from(i, cfg) for i in range(12)] == [i >= first for i in range(12)]
    assert first_zero_lr_step(SimpleNamespace(decay_lr=True, min_lr=1e-5, warmup_iters=0, lr_decay_iters=2)) is None
    assert first_zero_lr_step(SimpleNamespace(decay_lr=False, min_lr=0.0, warmup_iters=0, lr_decay_iters=2)) is None


def test_a_new_run_says_its_steps_at_learning_rate_0_and_a_resume_into_them_is_refused_in_the_same_words(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sched = ["--set", "min_lr=0", "--set", "max_iters=4", "--set", "lr_decay_iters=2", "--set", "warmup_iters=0"]
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", "--device", "cpu", "--preset", "tiny", *SMALL,
                         *sched, "--out", "o", "--no-progress")
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if "learning rate 0" in ln]
    assert notes == ["note: 2 steps of this run's 4 (steps 2 to 3) train at learning rate 0 and change no weight: the "
                     "schedule reaches min_lr 0 at lr_decay_iters 2 and holds it (min_lr 0 from --set, lr_decay_iters 2 "
                     "from --set, max_iters 4 from --set); raise lr_decay_iters (to max_iters: --set lr_decay_iters=4) "
                     "or min_lr to train them"], err
    steps = [json.loads(ln) for ln in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in steps if r.get("type") == "train" and r["step"] >= 2] == [0.0, 0.0]  # as said
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--no-progress", "--set", "max_iters=6")
    assert code == 2 and "every step from 4 on has learning rate 0 (the schedule reaches min_lr 0 at lr_decay_iters 2 " \
                         "and holds it)" in err, err


def test_the_nanochat_preset_says_the_steps_a_longer_max_iters_alone_trains_at_0():
    """nanochat-d12 sets min_lr 0 and lr_decay_iters = max_iters (20,000): --set max_iters=30000 alone
    gives 10,000 steps at 0. As written, and with min_lr above 0, nothing is said; a resume names
    its own steps and --allow-changes."""
    said = []
    say_config_notes(load_config(preset="nanochat-d12", overrides=["max_iters=30000"]), None, said.append)
    assert len(said) == 1 and said[0].startswith("note: 10,000 steps of this run's 30,000 (steps 20,000 to 29,999) "
                                                 "train at learning rate 0"), said
    assert "min_lr 0 from preset nanochat-d12, lr_decay_iters 20000 from preset nanochat-d12" in said[0], said
    said = []
    say_config_notes(load_config(preset="nanochat-d12", overrides=["max_iters=30000"]), 25000, said.append,
                     resumed_at=19000)
    assert len(said) == 1 and "5,000 steps of this run's 6,000 (steps 20,000 to 24,999)" in said[0], said
    assert "--set lr_decay_iters=30000 --allow-changes)" in said[0], said
    longer = ["max_iters=30000"]
    for quiet, max_steps in ((load_config(preset="nanochat-d12"), None),
                             (load_config(preset="nanochat-d12", overrides=[*longer, "min_lr=1e-5"]), None),
                             (load_config(preset="nanochat-d12", overrides=longer), 20000)):  # stops where 0 starts
        said = []
        say_config_notes(quiet, max_steps, said.append)
        assert said == [], said
