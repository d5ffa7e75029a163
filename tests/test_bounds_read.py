"""Issue 19, reading: one typed schema per file read back, one path check, no more memory than the
machine has, inputs people really have. Unit tests of each mechanism; scripts/bad_inputs.py's
'19r:' rows run the same cases through the CLI."""
import os

import numpy as np
import pytest
import torch

from trainer.checkpoint.ckpt import read_checkpoint
from trainer.checkpoint.schema import CPU_RNG_BYTES, AutofitCheckpoint, CheckpointFieldError, validate
from trainer.errors import TrainError
from trainer.model.gpt import GPT, GPTConfig
from trainer.paths import PathProblem, TomlProblem, input_file, output_dir, parse_toml
from trainer.step import make_optimizer, train_step

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=61)


def _checkpoint(tmp_path, **edit):
    """A real autofit checkpoint of a 1-layer model, with top-level fields replaced."""
    from trainer.config.train_config import TrainConfig
    from trainer.model.gpt import model_args_of
    cfg = TrainConfig(**TINY, batch_size=4, gradient_accumulation_steps=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args_of(cfg)))
    opt = make_optimizer(model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    x = torch.randint(0, 61, (4, 16))
    train_step(model, opt, x, x, [4])
    sampler = {"seed": 1337, "block_size": 16, "counters": {"train": 1, "val": 0}}
    ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 1, "best_val_loss": 3.0,
          "config": cfg.model_dump(mode="json"), "model_args": model_args_of(cfg), "sampler": sampler,
          "eval_sampler": dict(sampler), "rng_cpu": torch.get_rng_state(), "micro_batches": [4],
          "plan": None, "device": {"kind": "cpu"}, "compile_failed": False}
    for k, v in edit.items():
        ck[k] = v(ck) if callable(v) else v
    path = tmp_path / "ckpt.pt"
    torch.save(ck, path)
    return path


def _refusal(path) -> str:
    with pytest.raises(TrainError) as e:
        read_checkpoint(path, mmap=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


# ---------------------------------------------------------------- 1. checkpoint schema


def test_a_good_checkpoint_reads_back(tmp_path):
    ck = read_checkpoint(_checkpoint(tmp_path), mmap=True)
    assert ck["iter_num"] == 1


@pytest.mark.parametrize("edit, expected", [
    ({"iter_num": -5}, "iter_num: expected greater than or equal to 0, got -5"),
    ({"iter_num": "5"}, "iter_num: expected a valid integer, got '5'"),
    ({"iter_num": True}, "iter_num: expected a valid integer, got True"),
    ({"micro_batches": []}, "micro_batches: expected a list of at least 1 item, not 0, got []"),
    ({"micro_batches": [4, 0]}, "micro_batches: expected sizes >= 1, got [4, 0]"),
    ({"rng_cpu": torch.zeros(10, dtype=torch.uint8)}, f"rng_cpu: expected the CPU generator's state of {CPU_RNG_BYTES} bytes"),
    ({"rng_cpu": torch.zeros(CPU_RNG_BYTES)}, "rng_cpu: expected the CPU generator's state (a 1-D uint8 tensor)"),
    # the right size and type, but no generator's state: it was a traceback from inside training
    ({"rng_cpu": torch.full((CPU_RNG_BYTES,), 255, dtype=torch.uint8)},
     "rng_cpu: expected the CPU generator's state, which this is not (Invalid mt19937 state)"),
    ({"plan": "[1, 2]"}, "plan: expected a JSON object, got a list"),
    ({"plan": "{x"}, "plan: expected the plan as JSON text"),
    ({"best_val_loss": "low"}, "best_val_loss: expected a valid number"),
    ({"best_val_loss": float("nan")}, "best_val_loss: expected a number"),
    ({"world_size": 0}, "world_size: expected greater than or equal to 1"),
    ({"device": {"kind": "tpu"}}, "device.kind: expected 'cpu', 'cpu-budgeted', 'cuda' or 'simulated', got 'tpu'"),
    ({"device": {"kind": "cpu-budgeted", "budget_bytes": -1}}, "device.budget_bytes: expected greater"),
    ({"sampler": lambda ck: {**ck["sampler"], "counters": {"train": -1}}}, "sampler.counters: expected counts >= 0"),
    # k9's 'not done': emptied by hand, the counters restarted the data from its first batch, silently
    ({"sampler": lambda ck: {**ck["sampler"], "counters": {}}}, "sampler: expected counters to hold a batch count "
     "for each split of the data, got {}; one left out would start that split again from its first batch"),
    ({"eval_sampler": lambda ck: {**ck["sampler"], "counters": {"train": 3}, "data": {"train": {}, "val": {}}}},
     "eval_sampler: expected counters to hold a batch count for each split of the data (train, val), got {'train': 3}"),
    ({"optimizer": lambda ck: {**ck["optimizer"], "param_groups": []}}, "optimizer.param_groups: expected a list of at least 1 item"),
    ({"config": "big"}, "config: expected a valid dictionary"),
    ({"model": "weights"}, "model: expected a valid dictionary"),
])
def test_each_field_is_typed_and_in_range(tmp_path, edit, expected):
    assert expected in _refusal(_checkpoint(tmp_path, **edit))


def test_a_newer_checkpoint_format_says_upgrade_not_corrupt(tmp_path):
    """k9's 'not done': ckpt.pt had no format, so a newer autofit's (a sampler key this one does
    not know) read as a bad field. A checkpoint without the key is format 1 and reads as before."""
    from trainer.checkpoint.schema import CHECKPOINT_FORMAT, FORMAT_KEY, check_format
    assert check_format(torch.load(_checkpoint(tmp_path), weights_only=True), "f") == 1
    newer = CHECKPOINT_FORMAT + 1
    msg = _refusal(_checkpoint(tmp_path, **{FORMAT_KEY: newer},
                               sampler=lambda ck: {**ck["sampler"], "shuffle": "v2"}))
    assert msg == (f"{tmp_path / 'ckpt.pt'}: written by a newer autofit (format {newer}; this one reads up to "
                   f"{CHECKPOINT_FORMAT}): upgrade autofit")
    assert "upgrade" not in _refusal(_checkpoint(tmp_path, sampler=lambda ck: {**ck["sampler"], "shuffle": "v2"}))
    assert f"{FORMAT_KEY}: expected an integer >= 1, got 'two'" in _refusal(_checkpoint(tmp_path, **{FORMAT_KEY: "two"}))
    assert read_checkpoint(_checkpoint(tmp_path, **{FORMAT_KEY: CHECKPOINT_FORMAT}), mmap=True)["iter_num"] == 1


def test_weights_that_disagree_with_the_config_are_one_line_before_any_model(tmp_path):
    def two_layers(ck):
        return {**ck["config"], "n_layer": 2}
    msg = _refusal(_checkpoint(tmp_path, config=two_layers))
    assert "model: the model state lacks transformer.h.1." in msg
    assert "the weights have 1 layer, config says n_layer=2" in msg

    def wrong_shape(ck):
        return {**ck["model"], "transformer.wte.weight": torch.zeros(3, 3)}
    assert "model: transformer.wte.weight has shape (3, 3), config" in _refusal(_checkpoint(tmp_path, model=wrong_shape))


def test_optimizer_state_must_match_the_parameters(tmp_path):
    def reorder(ck):
        opt = {**ck["optimizer"], "param_groups": [dict(g) for g in ck["optimizer"]["param_groups"]]}
        opt["param_groups"][0]["params"] = list(reversed(opt["param_groups"][0]["params"]))
        return opt
    assert "the parameter order differs" in _refusal(_checkpoint(tmp_path, optimizer=reorder))

    def one_group(ck):
        return {**ck["optimizer"], "param_groups": ck["optimizer"]["param_groups"][:1]}
    assert "optimizer state has 1 parameter groups" in _refusal(_checkpoint(tmp_path, optimizer=one_group))


def test_a_config_value_out_of_range_names_the_config(tmp_path):
    msg = _refusal(_checkpoint(tmp_path, config=lambda ck: {**ck["config"], "batch_size": -3}))
    assert ": config: " in msg and "batch_size" in msg


def test_nanogpt_layout_fields_are_typed_too(tmp_path):
    from trainer.checkpoint.nanogpt import CheckpointError, read_nanogpt_checkpoint
    nano = ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config")
    path = _checkpoint(tmp_path)
    ck = torch.load(path, weights_only=True)
    ck = {k: ck[k] for k in nano}
    ck["best_val_loss"] = torch.tensor(2.5)  # nanoGPT saves a 0-d tensor: accepted
    torch.save(ck, path)
    assert read_nanogpt_checkpoint(path).best_val_loss == 2.5
    ck["iter_num"] = -5
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=r"ckpt.pt: iter_num: expected greater than or equal to 0"):
        read_nanogpt_checkpoint(path)


def test_validate_refuses_what_is_not_a_dict():
    with pytest.raises(CheckpointFieldError, match="f.pt: expected a checkpoint dict, got list"):
        validate(AutofitCheckpoint, [1], "f.pt")


# ---------------------------------------------------------------- 1. saved plans and hardware


def test_a_hand_edited_plan_and_hardware_table_are_refused_naming_the_field(tmp_path, monkeypatch):
    from autofit.profiles.store import ProfileError, _read_file
    from autofit.records import PlanRecord
    plan = dict(mode="measured", micro_batch=4, grad_accum=2, micro_batches=[4, 4], effective_batch=8, block_size=16,
                dtype="float32", compile=False, compile_after=0, checkpointing=0, loss_impl="standard",
                budget_bytes=1, split="8 = 4 x 2")
    PlanRecord(**plan)
    for bad, why in [({"micro_batch": 0}, "micro_batch"), ({"micro_batches": [4, 3]}, "must add up"),
                     ({"micro_batches": []}, "micro_batches"), ({"world_size": 0}, "world_size")]:
        with pytest.raises(ValueError, match=why):
            PlanRecord(**{**plan, **bad})
    p = tmp_path / "cpu-64mb.toml"
    for table, field in [('kind = "cpu"\nmemory_bytes = ' + "1" + "0" * 30, "hardware: memory_bytes"),
                         ('kind = "cpu"\nmemory_bytes = 0', "hardware: memory_bytes"),
                         ('compute_capability = []', "hardware: compute_capability"),
                         ('peak_fp16_tflops = -1.0', "hardware: peak_fp16_tflops"),
                         ('kind = "tpu"', "hardware: kind")]:
        p.write_text(f'schema_version = 1\nname = "cpu-64mb"\n[hardware]\n{table}\n')
        with pytest.raises(ProfileError, match=field):
            _read_file(p)
    p.write_text('schema_version = 1\nname = "cpu-64mb"\n[hardware]\nkind = "cpu"\nmemory_bytes = 67108864\n'
                 'peak_fp16_tflops = 192\n')  # an integer where a float is meant: TOML writes it so
    assert _read_file(p).hardware["memory_bytes"] == 67108864


# ---------------------------------------------------------------- 3. paths


def test_input_file_refuses_links_fifos_devices_and_folders(tmp_path):
    (tmp_path / "f").write_text("x")
    os.symlink("nowhere", tmp_path / "dangling")
    os.symlink("loop", tmp_path / "loop")
    os.symlink("f", tmp_path / "to-file")
    os.mkfifo(tmp_path / "fifo")
    assert input_file(tmp_path / "to-file", "config") == tmp_path / "to-file"
    for name, why in [("dangling", "a symbolic link to nowhere, which does not exist"),
                      ("loop", "a loop of symbolic links"), ("fifo", r"is a FIFO \(named pipe\), not a regular file"),
                      ("missing", "no such file"), (".", "is a folder, not a regular file")]:
        with pytest.raises(PathProblem, match=why):
            input_file(tmp_path / name, "config")
    with pytest.raises(PathProblem, match="/dev/zero is a character device"):
        input_file("/dev/zero", "--start FILE:")


def test_output_dir_refuses_what_cannot_hold_files_and_tests_by_writing(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    os.symlink("nowhere", tmp_path / "dangling")
    os.symlink("loop", tmp_path / "loop")
    os.symlink("f", tmp_path / "to-file")
    os.mkfifo(tmp_path / "fifo")
    assert output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()
    for name, why in [("dangling", "which does not exist"), ("loop", "a loop of symbolic links"),
                      ("to-file", "is a file, not a folder"), ("fifo", "is a FIFO"),
                      ("dangling/sub", "which does not exist"), ("f/sub", "is a file, not a folder")]:
        with pytest.raises(PathProblem, match=why):
            output_dir(tmp_path / name, "--out")
    # os.access is not asked (it says yes to root everywhere): a folder where a write fails is refused
    import tempfile
    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, dir=None, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if str(dir) == str(tmp_path) else real(*a, dir=dir, **k))
    with pytest.raises(PathProblem, match=f"{tmp_path} is not writable"):
        output_dir(tmp_path / "o", "--out")


def test_resume_of_a_fifo_checkpoint_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "ckpt.pt")
    with pytest.raises(TrainError, match="is a FIFO"):  # an open() would wait for a writer forever
        read_checkpoint(tmp_path / "ckpt.pt")


# ---------------------------------------------------------------- 4. memory the machine has


def test_a_budget_above_the_machine_is_refused(monkeypatch):
    from autofit.devices import cpu
    from autofit.devices.device import DeviceError
    from autofit.devices.opener import open_device
    monkeypatch.setattr(cpu, "machine_memory_bytes", lambda: 8 * 2**30)
    with pytest.raises(DeviceError, match=r"--budget: 16.00 GiB is more than this machine's memory \(8.00 GiB"):
        open_device("cpu", budget_bytes=16 * 2**30)
    with pytest.raises(DeviceError, match="holds at most 25 such ranks"):
        cpu.check_ranks_fit(26, 64 * 2**20, "cpu")  # 26 x (64 MiB + 256 MiB assumed) > 8 GiB
    cpu.check_ranks_fit(25, 64 * 2**20, "cpu")


def test_the_ranks_memory_check_counts_each_ranks_own_budget(monkeypatch):
    """check_ranks_fit counted --budget only: AUTOFIT_RANK_BUDGETS=3GiB,5GiB on an 8 GiB machine passed
    the launcher, and each rank then opened a budget the machine could not give them all."""
    import torch

    from autofit.devices import cpu
    from autofit.devices.device import DeviceError
    from autofit.units import parse_size
    monkeypatch.setattr(cpu, "machine_memory_bytes", lambda: 8 * 2**30)
    with pytest.raises(DeviceError) as e:  # 3 + 5 GiB + 2 x 256 MiB assumed > 8 GiB
        cpu.check_ranks_fit(2, None, "cpu", [3 * 2**30, 5 * 2**30])
    assert str(e.value) == ("--nproc-per-node 2: the ranks' AUTOFIT_RANK_BUDGETS budgets (8.00 GiB in all) and their "
                            "processes (~256.0 MiB each, assumed) need 8.50 GiB, more than this machine's memory "
                            "(8.00 GiB, physical RAM or the container's limit); give the ranks at most 7.50 GiB in all")
    cpu.check_ranks_fit(2, None, "cpu", [3 * 2**30, 9 * 2**29])  # 8 GiB exactly: fits
    with pytest.raises(DeviceError) as e:  # r8: the sum read '100000000000000000000.00 TiB in all'
        cpu.check_ranks_fit(2, None, "cpu", [parse_size("99999999999999999999TiB"), 2**30])
    assert str(e.value).startswith("--nproc-per-node 2: the ranks' AUTOFIT_RANK_BUDGETS budgets (1.10e+32 B in all) "
                                   "and their processes (~256.0 MiB each, assumed) need 1.10e+32 B, more than")
    with pytest.raises(DeviceError, match=r"need 8\.28 GiB, .*; their processes alone need 8\.25 GiB: use fewer ranks$"):
        cpu.check_ranks_fit(33, None, "cpu", [2**20] * 33)  # the processes alone do not fit
    # the sizes put the ranks on the CPU, GPU or not; where the GPU is asked for, each rank would refuse them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cpu.check_ranks_fit(2, None, None, [2**30, 2**30])  # not 'this machine has 1 GPU, one per rank'
    with pytest.raises(DeviceError, match=r"^--nproc-per-node 2: the ranks' AUTOFIT_RANK_BUDGETS budgets"):
        cpu.check_ranks_fit(2, None, None, [3 * 2**30, 5 * 2**30])
    with pytest.raises(DeviceError) as e:
        cpu.check_ranks_fit(1, None, "cuda", [2**30], "device 'cuda' from the config; --device to choose another")
    assert str(e.value) == ("AUTOFIT_RANK_BUDGETS applies to the CPU device only; on a GPU the budget is free memory x "
                            "(1 - margin) (device 'cuda' from the config; --device to choose another)")


def test_ranks_on_cuda_without_a_gpu_are_sent_to_the_cpu_not_to_zero_ranks(monkeypatch):
    """h3 (session 10): `--device cuda --nproc-per-node 2` on a machine with no GPU said 'use
    --nproc-per-node 0 or fewer', which is refused in turn."""
    import torch

    from autofit.devices import cpu
    from autofit.devices.device import DeviceError
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceError) as e:
        cpu.check_ranks_fit(2, None, "cuda")
    assert "--nproc-per-node 0" not in str(e.value) and "use --device cpu" in str(e.value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="this machine has 1 GPU, one per rank"):
        cpu.check_ranks_fit(2, None, "cuda")


def test_a_huge_step_batch_is_read_a_micro_batch_at_a_time_with_the_same_result(tmp_path, monkeypatch):
    from trainer.data import batches
    from trainer.data.datasets import BatchSampler, TokenDataset, TokenSplit
    # 8M sequences of 32 (gradient_accumulation_steps = 1000000) are not held; 8 are
    assert batches.held_rows(10**6 * 8, 32) == 0 and batches.held_rows(8, 32) == 8
    data = np.random.default_rng(0).integers(0, 61, 5000).astype(np.uint16)
    ds = TokenDataset("toy", "nanogpt", 61, {s: TokenSplit([data], ["toy"]) for s in ("train", "val")})

    def step(limit):
        monkeypatch.setattr(batches, "WHOLE_BATCH_MAX_BYTES", limit)
        sb = batches.StepBatches(BatchSampler(ds, 16, seed=3))
        x, y = sb.take(12)
        sb.close()
        torch.manual_seed(0)
        m = GPT(GPTConfig(**TINY))
        opt = make_optimizer(m, learning_rate=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
        res = train_step(m, opt, x, y, [5, 5, 2])
        return x, res.loss, m.transformer.wte.weight.detach().clone()

    whole_x, whole_loss, whole_w = step(1 << 30)
    lazy_x, lazy_loss, lazy_w = step(1)
    assert isinstance(whole_x, torch.Tensor) and isinstance(lazy_x, batches.LazyStepBatch)
    assert len(lazy_x) == 12 and torch.equal(lazy_x.rows(0, 12)[0], whole_x)
    assert lazy_loss == pytest.approx(whole_loss, rel=1e-6)
    assert torch.allclose(lazy_w, whole_w, atol=1e-6)


# ---------------------------------------------------------------- 5. inputs people have


def test_toml_with_a_bom_and_deep_nesting(tmp_path):
    from trainer.config.train_config import ConfigError, load_config
    (tmp_path / "c.toml").write_bytes(b"\xef\xbb\xbfn_layer = 3\n")
    assert load_config(config_file=tmp_path / "c.toml").n_layer == 3
    with pytest.raises(TomlProblem, match="nested too deeply"):
        parse_toml("a = " + "[" * 20000)
    (tmp_path / "d.toml").write_text("a = " + "[" * 20000)
    with pytest.raises(ConfigError, match="invalid TOML: arrays or tables nested too deeply"):
        load_config(config_file=tmp_path / "d.toml")


def test_toml_key_lines_are_found_in_one_pass(tmp_path, monkeypatch):
    from trainer.config import train_config
    text = "".join(f"k{i} = {i}\n" for i in range(2000)) + '"quoted" = 1\n[train]\nn_layer = 2\n'
    calls = []
    real = train_config._KEY_LINE

    class Counting:
        def match(self, s):
            calls.append(s)
            return real.match(s)
    monkeypatch.setattr(train_config, "_KEY_LINE", Counting())
    out = train_config._read_toml(text, tmp_path / "c.toml")
    assert out["k1999"] == (1999, 2000) and out["quoted"] == (1, 2001) and out["n_layer"] == (2, 2003)
    assert len(calls) == text.count("\n")  # each line looked at once, whatever the number of keys


def test_a_sidecar_copied_with_its_file_is_not_trusted(tmp_path):
    import shutil
    from trainer.data import tokenfiles
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir(), big.mkdir()
    (np.arange(200, dtype=np.uint16) % 11).tofile(small / "train.bin")
    assert tokenfiles.max_token(small / "train.bin", np.fromfile(small / "train.bin", dtype=np.uint16)) == 10
    np.arange(200, dtype=np.uint16).tofile(big / "train.bin")  # the same size: 200 ids, up to 199
    # cp -p of the small set's sidecar, and its file's mtime: size and mtime agree, the maximum is stale
    shutil.copy2(tokenfiles.sidecar_path(small / "train.bin"), tokenfiles.sidecar_path(big / "train.bin"))
    st = (small / "train.bin").stat()
    os.utime(big / "train.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    tokenfiles._MEMO.clear()
    assert tokenfiles.max_token(big / "train.bin", np.fromfile(big / "train.bin", dtype=np.uint16)) == 199


def test_sample_refuses_temperatures_and_seeds_it_cannot_use():
    from trainer.sample import SampleError, SampleOptions, check_options
    for t in (float("inf"), float("nan"), 1e-300, 0.0, -1.0):
        with pytest.raises(SampleError, match="--temperature must be"):
            check_options(SampleOptions(temperature=t))
    for seed in (-1, 2**64):
        with pytest.raises(SampleError, match="--seed must be an integer in 0 .. 2"):
            check_options(SampleOptions(seed=seed))
    check_options(SampleOptions(temperature=1e-6, seed=2**64 - 1))
