import time
from pathlib import Path

import pytest

from autofit.profiles.fingerprints import config_summary
from trainer.config.train_config import (PRESETS, ConfigError, TrainConfig, load_config, parse_override,
                                         parse_py_config)

from seed_case import SEED


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- defaults and presets


def test_defaults_are_nanogpt_train_py():
    cfg = TrainConfig()
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.block_size) == (12, 40, 1024)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (12, 12, 768, 50304)
    assert (cfg.learning_rate, cfg.min_lr, cfg.beta2, cfg.seed) == (6e-4, 6e-5, 0.95, 1337)
    assert cfg.effective_batch == 480
    assert cfg.tokens_per_step == 480 * 1024
    assert load_config() == cfg  # no preset: the class defaults


def test_seed_file_loads_as_is(tmp_path):
    cfg = load_config(config_file=write(tmp_path, "seed.py", SEED))
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.block_size) == (16, 32, 1024)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (12, 12, 576, 50304)
    assert cfg.compile is True and cfg.dtype == "bfloat16"
    assert cfg.effective_batch == 512


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = load_config(preset=name)
    for key, value in PRESETS[name].items():
        assert getattr(cfg, key) == value


def test_tiny_preset_is_small_and_cpu_ready():
    cfg = load_config(preset="tiny")
    params = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd + cfg.block_size * cfg.n_embd
    assert params < 1_000_000
    assert cfg.vocab_size == 256 and cfg.dtype == "float32" and cfg.compile is False
    assert cfg.dataset == "embedded"


def test_seed_preset_matches_seed_file(tmp_path):
    from_file = load_config(config_file=write(tmp_path, "seed.py", SEED))
    assert config_summary(load_config(preset="rtx4070-seed")) == config_summary(from_file)


def test_unknown_preset_suggests():
    msg = one_line_error(preset="gpt2-124")
    assert "unknown preset 'gpt2-124'" in msg and "did you mean 'gpt2-124m'" in msg


# ---------------------------------------------------------------- sources and precedence


def test_precedence_preset_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "c.py", "batch_size = 8\nlearning_rate = 2e-3\n")
    cfg = load_config(preset="tiny", config_file=path, overrides=["learning_rate=5e-3"])
    assert cfg.n_layer == 4  # preset, untouched by the others
    assert cfg.batch_size == 8  # file over preset
    assert cfg.learning_rate == 5e-3  # override over file


def test_toml_top_level_and_train_table(tmp_path):
    top = write(tmp_path, "a.toml", 'batch_size = 4\ndtype = "float16"\ncompile = false\n')
    cfg = load_config(preset="tiny", config_file=top)
    assert (cfg.batch_size, cfg.dtype, cfg.compile) == (4, "float16", False)
    table = write(tmp_path, "b.toml", '[train]\nn_layer = 2\nlearning_rate = 3e-3\n')
    cfg = load_config(preset="tiny", config_file=table)
    assert (cfg.n_layer, cfg.learning_rate) == (2, 3e-3)


def test_toml_unknown_key_names_line(tmp_path):
    path = write(tmp_path, "a.toml", "batch_size = 4\nn_embed = 64\n")
    msg = one_line_error(config_file=path)
    assert f"{path}:2: unknown key 'n_embed' (did you mean 'n_embd'?)" in msg


def test_bad_toml_is_one_line(tmp_path):
    msg = one_line_error(config_file=write(tmp_path, "a.toml", "batch_size = = 4\n"))
    assert "invalid TOML" in msg


def test_missing_file_and_bad_extension(tmp_path):
    missing = tmp_path / "nope.py"
    assert one_line_error(config_file=missing) == f"config file not found: {missing}"
    msg = one_line_error(config_file=write(tmp_path, "c.yaml", "batch_size: 4\n"))
    assert "unsupported config file type '.yaml'" in msg
    (tmp_path / "config").mkdir()  # a folder, e.g. nanoGPT's config/: it exists, it is not "not found"
    assert one_line_error(config_file=tmp_path / "config") == f"config file {tmp_path / 'config'} is a folder: " \
                                                               f"name a .py or .toml file in it"


# ---------------------------------------------------------------- .py configs: parsed, never run


def test_literal_arithmetic_docstrings_and_comments(tmp_path):
    text = ('"""a nanoGPT config"""\n'
            "# comment\n"
            "gradient_accumulation_steps = 5 * 8\n"
            "learning_rate = 6e-4 / 10  # trailing comment\n"
            "max_iters = 2 ** 10 + 1\n"
            "warmup_iters = -(-100) // 3\n"
            "lr_decay_iters = 1000 % 7\n"
            "'a bare string'\n"
            "min_lr = +1e-5\n"
            "compile_after = None\n"
            "batch_size = 4\n"
            "batch_size = 6\n")  # later assignment wins, as when nanoGPT execs it
    cfg = load_config(config_file=write(tmp_path, "c.py", text))
    assert cfg.gradient_accumulation_steps == 40
    assert cfg.learning_rate == pytest.approx(6e-5)
    assert cfg.max_iters == 1025
    assert cfg.warmup_iters == 33
    assert cfg.lr_decay_iters == 6
    assert cfg.min_lr == 1e-5
    assert cfg.compile_after is None
    assert cfg.batch_size == 6


def test_a_name_assigned_above_is_its_value(tmp_path):
    """t4 (session 13): `lr_decay_iters = max_iters`, common in hand-written nanoGPT configs (which
    nanoGPT execs), was refused as a name reference. A name set above is its value then; a later
    assignment does not change it, as under exec; a name set below, or never, is refused."""
    path = write(tmp_path, "c.py", "max_iters = 100\nlr_decay_iters = max_iters\nwarmup_iters = max_iters // 10\n"
                                   "max_iters = 200\n")
    cfg = load_config(config_file=path)
    assert (cfg.max_iters, cfg.lr_decay_iters, cfg.warmup_iters) == (200, 100, 10)
    msg = one_line_error(config_file=write(tmp_path, "d.py", "lr_decay_iters = max_iters\nmax_iters = 100\n"))
    assert msg.startswith(f"{tmp_path / 'd.py'}:1: refused: name reference 'max_iters': only a name assigned above"), msg
    msg = one_line_error(config_file=write(tmp_path, "f.py", "stages = [dict(until_iter=10, block_size=32, "
                                                            "tokens_per_step=64)]\nwandb_run_name = stages\n"))
    assert "f.py:2: refused: name reference 'stages': a list of tables, which only its own key takes" in msg, msg
    # r1: a string added to itself doubles on each line: 40 lines would ask for terabytes
    doubling = "s = 'x'\n" + "s = s + s\n" * 40
    msg = one_line_error(config_file=write(tmp_path, "e.py", doubling))
    assert msg.startswith(f"{tmp_path / 'e.py'}:18: refused: a string longer than 65,536 characters"), msg


@pytest.mark.parametrize("line, reason", [
    ("import os", "import"),
    ("from os import path", "import"),
    ("n_layer = some_var", "name reference 'some_var'"),
    ("n_layer = os.cpu_count", "attribute access"),
    ("wandb_run_name = f'run{1}'", "f-string"),
    ("n_layer = int('4')", "function call"),
    ("n_layer += 1", "augmented assignment"),
    ("if True:\n    n_layer = 2", "if statement"),
    ("n_layer, n_head = 2, 2", "assignment to tuple"),
    ("n_layer = n_head = 2", "chained assignment"),
    ("n_layer = [2]", "list"),
    ("wandb_run_name = 'x' * 1000", "arithmetic is only allowed on numbers"),
    ("n_layer = 1 / 0", "division by zero"),
])
def test_py_refusals_name_file_and_line(tmp_path, line, reason):
    path = write(tmp_path, "c.py", f"batch_size = 4\n{line}\n")
    msg = one_line_error(config_file=path)
    assert msg.startswith(f"{path}:2: refused: {reason}"), msg
    assert "only literal assignments are allowed" in msg


def test_py_config_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "evil.py", 'batch_size = 4\nimport os\nos.system("touch pwned")\n')
    msg = one_line_error(config_file=path)
    assert f"{path}:2: refused: import" in msg
    # The call alone (an exec-based loader would run it) is refused too, on its own line.
    path = write(tmp_path, "evil2.py", '"""doc"""\n\nos.system("touch pwned")\n')
    assert f"{path}:3: refused: function call" in one_line_error(config_file=path)
    assert not (tmp_path / "pwned").exists()


def test_huge_exponent_is_refused_quickly():
    """Refused before evaluating (a missing guard would compute for hours; pytest's own timeout of
    the run is the bound, no clock is read here)."""
    for text in ("max_iters = 10 ** 10 ** 10\n", "max_iters = 9 ** 65\n",
                 "max_iters = (2 ** 64) ** 64\n", "learning_rate = 1e300 * 1e300\n"):
        with pytest.raises(ConfigError, match=r"c\.py:1: refused: (exponent .* too large|number too large)"):
            parse_py_config(text, "c.py")
    assert parse_py_config("max_iters = 2 ** 64\n")["max_iters"] == (2 ** 64, 1)


def test_py_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "c.py", "batch_size = 4\nn_layer = = 2\n")
    assert one_line_error(config_file=path).startswith(f"{path}:2: syntax error")


# ---------------------------------------------------------------- overrides


def test_override_parsing():
    assert parse_override("compile=False") == ("compile", False)
    assert parse_override("compile=false") == ("compile", False)
    assert parse_override("bias=true") == ("bias", True)
    assert parse_override("learning_rate=3e-4") == ("learning_rate", 3e-4)
    assert parse_override("batch_size = 8") == ("batch_size", 8)
    assert parse_override("dtype=bfloat16") == ("dtype", "bfloat16")
    assert parse_override("out_dir=out/run1") == ("out_dir", "out/run1")
    assert parse_override("init_from='resume'") == ("init_from", "resume")
    assert parse_override("compile_after=None") == ("compile_after", None)
    assert parse_override("min_lr=6e-4/10") == ("min_lr", pytest.approx(6e-5))
    # A string field keeps what was typed, even when it reads as a number.
    assert parse_override("wandb_run_name=123") == ("wandb_run_name", "123")
    # None switches off a text field that takes it (nanoGPT's `tensorboard_dir = None`; it made a
    # folder named 'None'); a field that must be text keeps the word
    assert parse_override("tensorboard_dir=None") == ("tensorboard_dir", None)
    assert parse_override("out_dir=None") == ("out_dir", "None")


def test_overrides_apply():
    cfg = load_config(preset="tiny", overrides=["dtype=bfloat16", "compile=True", "learning_rate=3e-4",
                                                "loss_impl=chunked", "checkpointing=2"])
    assert (cfg.dtype, cfg.compile, cfg.learning_rate) == ("bfloat16", True, 3e-4)
    assert (cfg.loss_impl, cfg.checkpointing) == ("chunked", 2)


def test_malformed_override():
    assert "--set expects key=value, got 'compile'" in one_line_error(overrides=["compile"])


def test_unknown_override_key_suggests():
    msg = one_line_error(overrides=["n_embed=64"])
    assert msg == "--set: unknown key 'n_embed' (did you mean 'n_embd'?)"


# ---------------------------------------------------------------- validation


def test_n_embd_not_divisible_by_n_head_names_both(tmp_path):
    msg = one_line_error(preset="tiny", overrides=["n_head=3"])
    assert "n_embd (128) must be divisible by n_head (3)" in msg
    assert "n_head from --set" in msg and "n_embd from preset tiny" in msg


def test_negative_batch_names_key_and_source(tmp_path):
    path = write(tmp_path, "c.py", "n_layer = 2\nbatch_size = -4\n")
    msg = one_line_error(config_file=path)
    assert f"batch_size=-4 ({path}:2)" in msg and "greater than 0" in msg


def test_dtype_typo_suggests():
    msg = one_line_error(overrides=["dtype=bfloat61"])
    assert "dtype='bfloat61' (--set)" in msg and "did you mean 'bfloat16'" in msg


@pytest.mark.parametrize("override, needle", [
    ("dropout=1.0", "dropout=1.0"),
    ("loss_impl=fused", "loss_impl='fused'"),
    ("checkpointing=13", "checkpointing (13) must be between 0 and n_layer (12)"),
    ("checkpointing=-1", "checkpointing=-1"),
    ("min_lr=1e-2", "min_lr (0.01) must not exceed learning_rate"),
    ("device=gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("block_size=0", "block_size=0"),
    ("batch_size=2.5", "batch_size=2.5"),
    # strict types: --set text is read as the field's type, and nothing else
    ("batch_size=2.5", "batch_size=2.5 (--set): must be an integer, not a float"),
    ("batch_size=true", "batch_size=True (--set): must be an integer, not a bool"),
    ("batch_size=eight", "batch_size='eight' (--set): must be an integer, not a string"),
    ("compile=1", "compile=1 (--set): must be True or False"),
    ("compile=yes", "compile='yes' (--set): must be True or False"),
    ("learning_rate=fast", "learning_rate='fast' (--set): must be a number"),
])
def test_bad_values_are_one_line(override, needle):
    assert needle in one_line_error(overrides=[override])


def test_several_errors_share_one_line():
    msg = one_line_error(overrides=["batch_size=0", "dropout=-0.1"])
    assert "batch_size=0" in msg and "dropout=-0.1" in msg


def test_min_lr_unchecked_without_decay():
    # nanoGPT's finetune configs: a small learning_rate, decay off, min_lr left at its default.
    cfg = load_config(overrides=["learning_rate=3e-5", "decay_lr=False"])
    assert cfg.min_lr > cfg.learning_rate


def test_cuda_devices_accepted():
    for dev in ("auto", "cpu", "cuda", "cuda:1"):
        assert load_config(overrides=[f"device={dev}"]).device == dev


def test_direct_construction_and_assignment_raise_config_error():
    with pytest.raises(ConfigError, match="unknown key 'n_embed'"):
        TrainConfig(n_embed=64)
    cfg = load_config(preset="tiny")
    with pytest.raises(ConfigError, match="must be divisible"):
        cfg.n_head = 3
    assert cfg.n_head == 4  # a refused assignment leaves the config as it was
    cfg.out_dir = "elsewhere"
    assert cfg.out_dir == "elsewhere"


def test_json_round_trip():
    cfg = load_config(preset="rtx4070-seed", overrides=["compile_after=5"])
    assert TrainConfig(**cfg.model_dump(mode="json")) == cfg


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize("dtype, device, bf16, expected", [
    ("auto", "cuda", True, "bfloat16"),
    ("auto", "cuda", False, "float16"),
    ("auto", "cpu", True, "float32"),
    ("float16", "cuda", True, "float16"),
    ("bfloat16", "cpu", False, "bfloat16"),
])
def test_resolved_dtype(dtype, device, bf16, expected):
    assert TrainConfig(dtype=dtype).resolved_dtype(device, bf16) == expected


def test_config_summary():
    summary = config_summary(load_config(preset="rtx4070-seed"))
    assert summary["effective_batch"] == 512
    assert summary["n_embd"] == 576 and summary["dtype"] == "bfloat16"
    assert {"n_layer", "n_head", "block_size", "vocab_size", "bias", "dropout", "compile",
            "checkpointing", "loss_impl", "batch_size", "gradient_accumulation_steps"} <= set(summary)
    assert "out_dir" not in summary and "learning_rate" not in summary  # not memory-relevant


# ---------------------------------------------------------------- nanoGPT's own config files

NANOGPT_CONFIGS = Path(__file__).parent / "data" / "nanogpt_config"  # re-typed from nanoGPT's config/


@pytest.mark.parametrize("name, init_from", [("eval_gpt2", "gpt2"), ("eval_gpt2_medium", "gpt2-medium"),
                                             ("eval_gpt2_large", "gpt2-large"), ("eval_gpt2_xl", "gpt2-xl")])
def test_nanogpt_eval_configs_load(name, init_from, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config_file=NANOGPT_CONFIGS / f"{name}.py")
    assert (cfg.init_from, cfg.eval_only, cfg.batch_size, cfg.eval_iters) == (init_from, True, 8, 500)
    assert cfg.dataset == "openwebtext"  # nanoGPT's default, not the built-in corpus


def test_nanogpt_finetune_config_loads_with_import_time_and_run_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = time.time()
    cfg = load_config(config_file=NANOGPT_CONFIGS / "finetune_shakespeare.py")
    after = time.time()
    assert (cfg.init_from, cfg.dataset, cfg.decay_lr, cfg.always_save_checkpoint) == ("gpt2-xl", "shakespeare", False, False)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate) == (1, 32, 3e-5)
    assert cfg.wandb_run_name.startswith("ft-") and before <= float(cfg.wandb_run_name[3:]) <= after
    # str(time.time()) exactly, with the clock injected
    text = (NANOGPT_CONFIGS / "finetune_shakespeare.py").read_text()
    assert parse_py_config(text, "f.py", clock=lambda: 1712.5)["wandb_run_name"] == ("ft-1712.5", 8)


def test_nanogpt_train_configs_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gpt2 = load_config(config_file=NANOGPT_CONFIGS / "train_gpt2.py")
    assert (gpt2.wandb_log, gpt2.wandb_run_name, gpt2.gradient_accumulation_steps) == (True, "gpt2-124M", 40)
    assert (gpt2.dataset, gpt2.vocab_size, gpt2.source_of("vocab_size")) == ("openwebtext", 50304, "default")
    char = load_config(config_file=NANOGPT_CONFIGS / "train_shakespeare_char.py")
    assert (char.dataset, char.n_layer, char.n_embd, char.dropout, char.min_lr) == ("shakespeare_char", 6, 384, 0.2, 1e-4)
    assert char.source_of("n_embd").endswith("train_shakespeare_char.py:22")


def test_every_nanogpt_config_file_is_tested():
    # a new file in tests/data/nanogpt_config must be loaded by a test above
    assert sorted(p.stem for p in NANOGPT_CONFIGS.glob("*.py")) == sorted(
        ["eval_gpt2", "eval_gpt2_medium", "eval_gpt2_large", "eval_gpt2_xl", "finetune_shakespeare",
         "train_gpt2", "train_shakespeare_char"])


@pytest.mark.parametrize("line, reason", [
    ("import time as t", "import time as t: only `import time` is allowed"),
    ("import os, time", "import os, time"),
    ("from time import time", "import"),
    ("x = time.time()", "time.time() before `import time`"),
    ("import time\nn_layer = time.sleep(1)", "function call"),
    ("import time\nwandb_run_name = str(time.time(1))", "time.time() takes no arguments"),
    ("wandb_run_name = str(1, 2)", "str() takes one argument here"),
    ("wandb_run_name = str(x)", "name reference 'x'"),
    ("wandb_run_name = 'a' + 1", "arithmetic is only allowed on numbers"),
    ("wandb_run_name = 'a' - 'b'", "arithmetic is only allowed on numbers"),
    ("wandb_run_name = str(f'{1}')", "f-string"),
    ("wandb_run_name = repr(1)", "function call"),
])
def test_only_the_pure_forms_are_evaluated(tmp_path, line, reason):
    path = write(tmp_path, "c.py", f"batch_size = 4\n{line}\n")
    msg = one_line_error(config_file=path)
    assert f"{path}:" in msg and f"refused: {reason}" in msg, msg


def test_string_forms_evaluate(tmp_path):
    path = write(tmp_path, "c.py", "wandb_run_name = 'a-' + str(3 * 2) + '-' + str(1.5) + str(True)\n"
                                   "out_dir = 'out' + '/' + 'x'\n")
    cfg = load_config(config_file=path)
    assert (cfg.wandb_run_name, cfg.out_dir) == ("a-6-1.5True", "out/x")


# ---------------------------------------------------------------- init_from, eval_only, dataset


@pytest.mark.parametrize("value", ["scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_init_from_accepts_nanogpt_values(value):
    assert load_config(overrides=[f"init_from={value}"]).init_from == value
    assert load_config(overrides=[f"init_from='{value}'"]).init_from == value


def test_init_from_and_eval_only_refuse_other_values():
    assert "did you mean 'gpt2-xl'" in one_line_error(overrides=["init_from=gpt2-xxl"])
    assert load_config(overrides=["eval_only=True"]).eval_only is True
    assert load_config(overrides=["eval_only=false"]).eval_only is False
    msg = one_line_error(overrides=["eval_only=1"])
    assert msg == "invalid config: eval_only=1 (--set): must be True or False, not an integer"


def test_default_dataset_is_nanogpts_not_the_builtin_corpus(tmp_path):
    assert TrainConfig().dataset == "openwebtext"
    cfg = load_config(config_file=write(tmp_path, "c.py", "batch_size = 4\n"))
    assert cfg.dataset == "openwebtext"
    assert load_config(preset="tiny").dataset == "embedded"


# ---------------------------------------------------------------- vocab_size from the dataset


def _meta(root, name: str, vocab: int):
    import pickle
    d = root / "data" / name
    d.mkdir(parents=True)
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab, "itos": {}, "stoi": {}}))
    return d


def test_vocab_size_comes_from_meta_pkl_unless_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = _meta(tmp_path, "chars", 65)
    cfg = load_config(config_file=write(tmp_path, "c.py", "dataset = 'chars'\n"))
    assert cfg.vocab_size == 65 and cfg.source_of("vocab_size") == str(Path("data") / "chars" / "meta.pkl")
    # a path to the folder works too
    assert load_config(overrides=[f"dataset={d}"]).vocab_size == 65
    # set in the file or by --set: the user's value stands, and says where it came from
    path = write(tmp_path, "v.py", "dataset = 'chars'\nvocab_size = 128\n")
    cfg = load_config(config_file=path)
    assert cfg.vocab_size == 128 and cfg.source_of("vocab_size") == f"{path}:2"
    cfg = load_config(overrides=["dataset=chars", "vocab_size=96"])
    assert (cfg.vocab_size, cfg.source_of("vocab_size")) == (96, "--set")
    # a preset's vocab_size is a default: the dataset's own wins over it
    cfg = load_config(preset="tiny", overrides=["dataset=chars"])
    assert cfg.vocab_size == 65 and "meta.pkl" in cfg.source_of("vocab_size")


def test_vocab_size_without_meta_pkl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (load_config().vocab_size, load_config().source_of("vocab_size")) == (50304, "default")
    (tmp_path / "data" / "bpe").mkdir(parents=True)  # nanoGPT's BPE sets have no meta.pkl
    assert load_config(overrides=["dataset=bpe"]).vocab_size == 50304
    cfg = load_config(overrides=["dataset=embedded"])
    assert cfg.vocab_size == 256 and "embedded" in cfg.source_of("vocab_size")
    assert load_config(preset="tiny").source_of("vocab_size") == "the embedded dataset (byte tokens)"


def test_unsafe_meta_pkl_is_one_config_error(tmp_path, monkeypatch):
    import pickle
    monkeypatch.chdir(tmp_path)
    d = _meta(tmp_path, "evil", 65)
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": Path("x")}))
    msg = one_line_error(overrides=["dataset=evil"])
    assert "meta.pkl" in msg and "refusing to load" in msg
    assert load_config(overrides=["dataset=evil", "vocab_size=65"]).vocab_size == 65  # not read when set


# ---------------------------------------------------------------- checks a user wants


def test_cross_field_float_check_has_a_relative_tolerance(tmp_path):
    cfg = load_config(config_file=write(tmp_path, "c.py", "learning_rate = 6e-4 / 10\n"))
    assert cfg.learning_rate == 6e-4 / 10 < cfg.min_lr == 6e-5  # a rounding artefact, not an error
    assert "must not exceed" in one_line_error(overrides=["learning_rate=5.9e-5"])


FLOAT_FIELDS = [k for k, f in TrainConfig.model_fields.items() if f.annotation is float]


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("text", ["1e999", "inf", "-inf", "nan", "1e308*10"])
def test_non_finite_floats_are_refused_by_name(key, text):
    msg = one_line_error(overrides=[f"{key}={text}"])
    assert msg.startswith(f"invalid config: {key}=") and "(--set)" in msg and "finite" in msg, msg


def test_non_finite_in_files(tmp_path):
    msg = one_line_error(config_file=write(tmp_path, "c.py", "batch_size = 4\nlearning_rate = 1e999\n"))
    assert f"{tmp_path / 'c.py'}:2: refused: number too large (not a finite float)" in msg
    for value in ("inf", "nan", "-inf"):
        path = write(tmp_path, "c.toml", f"batch_size = 4\nlearning_rate = {value}\n")
        msg = one_line_error(config_file=path)
        assert f"({path}:2): must be a finite number, not inf or nan" in msg, msg


def test_floats_take_integers():
    cfg = load_config(overrides=["learning_rate=1", "min_lr=0"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


@pytest.mark.parametrize("name, first, line, needle", [
    ("c.py", "n_layer = 2", "batch_size = True", "batch_size=True ({path}:2): must be an integer, not a bool"),
    ("c.py", "n_layer = 2", "batch_size = 2.0", "batch_size=2.0 ({path}:2): must be an integer, not a float"),
    ("c.py", "n_layer = 2", "compile = 1", "compile=1 ({path}:2): must be True or False, not an integer"),
    ("c.py", "n_layer = 2", "dtype = 16", "dtype=16 ({path}:2)"),
    ("c.py", "n_layer = 2", "wandb_run_name = 5", "wandb_run_name=5 ({path}:2): must be a string, not an integer"),
    ("c.py", "n_layer = 2", "learning_rate = True", "learning_rate=True ({path}:2): must be a number, not a bool"),
    ("c.py", "n_layer = 2", "compile_after = 2.0", "compile_after=2.0 ({path}:2): must be an integer"),
    ("c.toml", "n_head = 2", "batch_size = true", "batch_size=True ({path}:2): must be an integer, not a bool"),
    ("c.toml", "n_head = 2", "batch_size = 2.0", "batch_size=2.0 ({path}:2): must be an integer, not a float"),
    ("c.toml", "n_head = 2", "compile = \"false\"", "compile='false' ({path}:2): must be True or False, not a string"),
    ("c.toml", "n_head = 2", "n_layer = \"4\"", "n_layer='4' ({path}:2): must be an integer, not a string"),
])
def test_strict_types_in_config_files(tmp_path, name, first, line, needle):
    """.py and TOML files alike: a value of the wrong type is refused, naming file and line."""
    path = write(tmp_path, name, f"{first}\n{line}\n")
    assert needle.format(path=path) in one_line_error(config_file=path)


def test_overrides_are_read_as_the_fields_type():
    cfg = load_config(overrides=["compile=False", "batch_size=8", "bias=TRUE", "compile_after=None",
                                 "wandb_run_name=123", "out_dir='quoted'", "gradient_accumulation_steps=5*8"])
    assert (cfg.compile, cfg.batch_size, cfg.bias, cfg.compile_after) == (False, 8, True, None)
    assert (cfg.wandb_run_name, cfg.out_dir, cfg.gradient_accumulation_steps) == ("123", "quoted", 40)
    assert parse_override("dtype=None") == ("dtype", "None")  # text field: the text, refused as a dtype


def test_strict_types_on_assignment():
    cfg = load_config(preset="tiny")
    for key, value in (("batch_size", True), ("batch_size", 2.0), ("compile", 0), ("learning_rate", float("nan"))):
        with pytest.raises(ConfigError, match=key):
            setattr(cfg, key, value)
    assert cfg.batch_size == 16 and cfg.compile is False


def test_config_json_is_strict_json_and_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from autofit.cli.app import main

    def cli(*args):
        monkeypatch.setattr(sys, "argv", ["autofit", *args])
        with pytest.raises(SystemExit) as e:
            main()
        out, err = capsys.readouterr()
        return e.value.code, out, err

    monkeypatch.chdir(tmp_path)
    code, out, err = cli("config", "--set", "learning_rate=1e999", "--json")
    assert code == 2 and out == "" and err.count("\n") == 1 and "learning_rate='1e999' (--set): number too large (not a finite float)" in err
    code, out, err = cli("config", "--set", "batch_size=2.5", "--set", "dropout=nan", "--json")
    assert code == 2 and out == "" and err.count("\n") == 1 and "batch_size" in err and "dropout" in err

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    code, out, _ = cli("config", "--set", "learning_rate=1", "--json")
    assert code == 0 and json.loads(out, parse_constant=refuse)["learning_rate"] == 1.0


@pytest.mark.parametrize("short, full", [("bf16", "bfloat16"), ("fp16", "float16"), ("FP32", "float32")])
def test_a_short_dtype_name_is_refused_with_the_name_it_stands_for(short, full):
    """'bf16' (other tools' flag) is not nanoGPT's name: refused, in --set and in probe --dtype
    alike, with the full name to use."""
    from autofit.planning.candidates import PlanError, candidate_space
    assert f"did you mean '{full}'" in one_line_error(overrides=[f"dtype={short}"])
    with pytest.raises(PlanError, match=f"unknown dtype '{short}'.*did you mean '{full}'"):
        candidate_space(load_config(preset="tiny"), "cpu", True, dtype=short)


def test_did_you_mean_is_case_blind():
    """'RMSNorm' is how papers write it; the suggestion must reach 'rmsnorm' (it said nothing)."""
    from trainer.config.messages import did_you_mean
    assert did_you_mean("RMSNorm", ["layernorm", "rmsnorm"]) == " (did you mean 'rmsnorm'?)"
    assert did_you_mean("N_Layers", ["n_layer", "n_head"]) == " (did you mean 'n_layer'?)"
    assert did_you_mean("bf16", ["float32", "bfloat16"]) == " (did you mean 'bfloat16'?)"
    assert did_you_mean("xyz", ["layernorm", "rmsnorm"]) == ""


def test_a_set_value_that_looks_like_a_bad_number_raises_no_syntax_warning():
    """--set dataset=/tmp/run-9ab/d: Python warns 'invalid decimal literal' while trying the value
    as an expression (on stderr, a second line beside a one-line error; it made the bad-input
    sweep fail when the temp folder's random name had a digit then letters)."""
    import warnings
    from trainer.config.pyfile import literal
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SyntaxError):
            literal("/tmp/bad-input-9innmz8i/d")
        cfg = load_config(preset="tiny", overrides=["out_dir=/tmp/run-9ab/o"])
    assert cfg.out_dir == "/tmp/run-9ab/o"
    assert not [w for w in seen if issubclass(w.category, SyntaxWarning)]


def test_an_effective_batch_past_what_autofit_plans_for_is_one_line():
    """batch_size 2^30 hung the probe (its run sizes were built cap by cap); 2^40 was a MemoryError."""
    from trainer.config.stages import MAX_EFFECTIVE_BATCH
    with pytest.raises(ConfigError, match=r"sequences per step is past the 16,777,216 autofit plans for"):
        load_config(preset="tiny", overrides=["batch_size=1073741824", "gradient_accumulation_steps=1"])
    with pytest.raises(ConfigError, match="past the"):
        load_config(preset="tiny", overrides=[f"batch_size={MAX_EFFECTIVE_BATCH}", "gradient_accumulation_steps=2"])
    assert load_config(preset="tiny", overrides=[f"batch_size={MAX_EFFECTIVE_BATCH}",
                                                 "gradient_accumulation_steps=1"]).effective_batch == MAX_EFFECTIVE_BATCH


def test_a_config_too_deep_for_pythons_parser_says_why():
    """'deep.py: cannot parse:' with nothing after it (an exception is always truthy, so `e or
    name` printed its empty message)."""
    from trainer.config.pyfile import parse_py_config
    with pytest.raises(ConfigError) as e:
        parse_py_config("x = " + "-" * 200_000 + "1\n", "deep.py")
    assert str(e.value).startswith("deep.py: cannot parse: ") and "nested too deeply" in str(e.value)


@pytest.mark.parametrize("dtype", ["any,", "float32,any"])
def test_any_in_a_dtype_list_says_it_stands_alone(dtype):
    """It said "unknown dtype 'any' (float32, bfloat16, float16, any)", naming it among the known."""
    from autofit.planning.candidates import PlanError, candidate_space
    with pytest.raises(PlanError, match=rf"^--dtype {dtype}: 'any' stands alone"):
        candidate_space(load_config(preset="tiny"), "cpu", True, dtype=dtype)


def test_a_home_folder_in_out_dir_or_tensorboard_dir_is_the_users_home(tmp_path, monkeypatch):
    """A config file meets no shell: out_dir = "~/runs/x" made a folder named '~' in the working
    directory, while the printed path looked like the home folder's (and `rm -rf ~` clears it)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "c.toml").write_text('out_dir = "~/runs/x"\ntensorboard_dir = "~/tb"\n')
    cfg = load_config(config_file=tmp_path / "c.toml")
    assert cfg.out_dir == str(tmp_path / "home" / "runs" / "x") and cfg.tensorboard_dir == str(tmp_path / "home" / "tb")
    assert load_config(overrides=["out_dir=~/y"]).out_dir == str(tmp_path / "home" / "y")
    cfg.out_dir = "~/z"  # --out, in a shell that did not expand it
    assert cfg.out_dir == str(tmp_path / "home" / "z")
    assert load_config(overrides=["out_dir=a~b"]).out_dir == "a~b" and TrainConfig().tensorboard_dir is None


def test_eval_only_with_no_eval_batches_is_refused():
    """t8 (session 15): eval_only=True with eval_iters=0 ended in a ZeroDivisionError traceback."""
    from trainer.config.pyfile import ConfigError
    with pytest.raises(ConfigError, match="eval_only evaluates eval_iters batches of each split, and eval_iters is 0"):
        load_config(preset="tiny", overrides=["eval_only=True", "eval_iters=0"])
    assert load_config(preset="tiny", overrides=["eval_only=True", "eval_interval=0"]).eval_only  # still evaluates


def test_the_shipped_configs_call_no_key_the_trainer_honours_ignored():
    """t11's L6: configs/gpt2_124m.py said `wandb_log = False  # accepted from nanoGPT configs,
    ignored`, though wandb_log = True logs the run to Weights & Biases (trainer.metrics). Of the keys
    taken from nanoGPT, only backend is ignored (torch.distributed's NCCL on CUDA, gloo on the CPU)."""
    for path in sorted((Path(__file__).parent.parent / "configs").iterdir()):
        for line in path.read_text().splitlines():
            setting, _, comment = line.partition("#")
            if "=" in setting and "ignored" in comment:
                assert setting.split("=")[0].strip() == "backend", f"{path.name}: {line}"


def test_backend_is_one_torch_distributed_knows():
    """t11's L6: `--set backend=foo` exited 0 and was ignored. The key stays ignored (autofit takes
    NCCL on CUDA, gloo on the CPU), but a name torch.distributed would refuse is refused in one line,
    as nanoGPT's init_process_group would; nanoGPT's own values and torch's per-device form load."""
    from trainer.config.train_config import ConfigError, load_config
    for ok in ("nccl", "gloo", "NCCL", "cpu:gloo,cuda:nccl", "mpi"):
        assert load_config(preset="tiny", overrides=[f"backend={ok}"]).backend == ok
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", overrides=["backend=ncl"])
    assert str(e.value).startswith("invalid config: backend='ncl' (--set): not a torch.distributed backend (did you "
                                   "mean 'nccl'?): give one of nccl, gloo, mpi, ucc, xccl") and "\n" not in str(e.value)
    for bad in ("foo", "cuda:foo", ""):
        with pytest.raises(ConfigError, match="not a torch.distributed backend"):
            load_config(preset="tiny", overrides=[f"backend={bad}"])
    import torch.distributed as dist  # every backend this torch knows is taken (less 'undefined' and 'fake')
    from trainer.config.system import BACKENDS
    assert set(dist.Backend.backend_list) - {"undefined", "fake"} <= set(BACKENDS)
