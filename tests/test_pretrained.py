"""GPT-2 weights in the Hugging Face format (trainer/model/pretrained.py), on tiny GPT-2 checkpoints the
tests write themselves: published key names, Conv1D (in, out) matrices, causal-mask buffers.
No network: HF_HUB_OFFLINE is set, and the hub cache is a temporary directory."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere in this process

import pytest
import torch
from safetensors.torch import save_file

from trainer.model import pretrained
from trainer.model.pretrained import WeightsError, load_gpt2

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_tensors(n_layer=2, n_embd=32, vocab_size=97, n_positions=16, seed=0, **_) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict as OpenAI's model.safetensors holds it: no 'transformer.' prefix, Conv1D
    weights stored (in, out), the h.N.attn.bias causal masks, no lm_head (tied to wte)."""
    g = torch.Generator().manual_seed(seed)
    C = n_embd

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    t = {"wte.weight": r(vocab_size, C), "wpe.weight": r(n_positions, C),
         "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(n_layer):
        p = f"h.{i}."
        t.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C),
                  p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                  p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                  p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
                  p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                  p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
                  p + "attn.bias": torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)})
    return t


def hf_config(activation="gelu", **over) -> dict:
    cfg = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function=activation,
               layer_norm_epsilon=1e-5, n_inner=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
               bos_token_id=0, eos_token_id=0, **TINY)
    cfg.update(over)
    return cfg


def write_tiny_gpt2(root: Path, tensors=None, config=None) -> Path:
    """A directory holding config.json and model.safetensors in the Hugging Face GPT-2 layout."""
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else hf_tensors(), str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config if config is not None else hf_config()))
    return root


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return write_tiny_gpt2(tmp_path / "tiny-gpt2")


def test_weights_land_in_our_names_with_conv1d_transposed(tiny_dir):
    model, args, source, notes = load_gpt2(None, source=tiny_dir)
    assert args == dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, block_size=16, bias=True, dropout=0.0)
    assert source == str(tiny_dir) and notes == []
    ref = hf_tensors()
    sd = model.state_dict()
    for key, value in ref.items():
        if key.endswith(".attn.bias") and value.dim() == 4:
            continue
        ours = sd["transformer." + key]
        expected = value.t() if key.endswith(CONV1D) else value
        assert torch.equal(ours, expected), key
    # tied: one tensor for wte and lm_head, so an optimizer sees it once
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(list(model.parameters())) == len(ref) - 2  # the 2 masks are not parameters; no lm_head
    assert not model.training


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("layout", ["published", "save_pretrained"])
def test_logits_equal_transformers_gpt2(tmp_path, tiny_dir, layout):
    transformers = pytest.importorskip("transformers")
    if layout == "published":
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(tiny_dir)).eval()
        src = tiny_dir
    else:  # what transformers itself writes: 'transformer.' prefix, no mask buffers
        torch.manual_seed(3)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config())).eval()
        src = tmp_path / "saved"
        hf.save_pretrained(str(src))
    model = load_gpt2(None, source=src).model
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
    torch.testing.assert_close(_logits(model, idx), ref, rtol=1e-5, atol=1e-5)


def test_published_gelu_new_runs_as_exact_gelu_as_nanogpt(tmp_path):
    """GPT-2's config.json asks for the tanh GELU; this model (as nanoGPT's) runs the exact one.
    The notes say so, and the logits differ from transformers' by a little, not a lot."""
    transformers = pytest.importorskip("transformers")
    src = write_tiny_gpt2(tmp_path / "gelu-new", config=hf_config(activation="gelu_new"))
    loaded = load_gpt2(None, source=src)
    assert any("gelu_new" in n and "exact GELU" in n for n in loaded.notes)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(src)).eval()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (_logits(loaded.model, idx) - hf(idx).logits).abs().max().item()
    assert 0 < diff < 1e-2


def test_block_size_crops_positions_and_keeps_the_logits(tiny_dir):
    full = load_gpt2(None, source=tiny_dir).model
    model, args, _, notes = load_gpt2(None, source=tiny_dir, block_size=8, dropout=0.2)
    assert args["block_size"] == 8 and args["dropout"] == 0.2
    assert model.config.block_size == 8 and model.config.dropout == 0.2
    assert model.transformer.wpe.weight.shape == (8, 32)
    assert torch.equal(model.transformer.wpe.weight, full.transformer.wpe.weight[:8])
    assert model.transformer.h[0].mlp.dropout.p == 0.2
    assert any("cropped from 16 to 8" in n for n in notes)
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(model, idx), _logits(full, idx))  # causal: the first 8 positions agree
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=17), "block_size 17: GPT-2 has 16 positions and block_size may only shrink"),
    (dict(block_size=0), "may only shrink"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_overrides(tiny_dir, kwargs, match):
    with pytest.raises(WeightsError, match=match):
        load_gpt2(None, source=tiny_dir, **kwargs)


def test_model_type_must_match_the_directory(tiny_dir):
    with pytest.raises(WeightsError, match=r"is not gpt2's config: n_layer 2 \(expected 12\)"):
        load_gpt2("gpt2", source=tiny_dir)
    with pytest.raises(WeightsError, match="unknown GPT-2 model 'gpt3'; choose one of gpt2, gpt2-medium"):
        load_gpt2("gpt3")
    with pytest.raises(WeightsError, match="needs a model type"):
        load_gpt2(None)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_and_broken_files(tmp_path, tiny_dir):
    with pytest.raises(WeightsError) as e:
        load_gpt2(None, source=tmp_path / "nowhere")
    assert "is not a directory" in _one_line(e)
    (tiny_dir / "model.safetensors").rename(tmp_path / "kept.safetensors")
    with pytest.raises(WeightsError) as e:
        load_gpt2(None, source=tiny_dir)
    assert f"{tiny_dir / 'model.safetensors'} not found" in _one_line(e) and "hf download" in str(e.value)
    (tiny_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(WeightsError) as e:
        load_gpt2(None, source=tiny_dir)
    assert "is not a readable safetensors file" in _one_line(e)
    (tiny_dir / "config.json").write_text("{not json")
    with pytest.raises(WeightsError) as e:
        load_gpt2(None, source=tiny_dir)
    assert "config.json is not a GPT-2 config.json" in _one_line(e)
    (tiny_dir / "config.json").write_text(json.dumps(hf_config(model_type="llama")))
    with pytest.raises(WeightsError, match="describes a 'llama' model, not GPT-2"):
        load_gpt2(None, source=tiny_dir)


def test_tensors_that_do_not_fit(tmp_path):
    src = write_tiny_gpt2(tmp_path / "a", config=hf_config(vocab_size=98))
    with pytest.raises(WeightsError) as e:
        load_gpt2(None, source=src)
    assert "tensor 'wte.weight' has shape (97, 32), the model needs (98, 32)" in _one_line(e)
    t = hf_tensors()
    t["h.1.mlp.c_fc.weight"] = t["h.1.mlp.c_fc.weight"].t().contiguous()  # stored (out, in): not Conv1D
    with pytest.raises(WeightsError, match=r"'h.1.mlp.c_fc.weight' has shape \(128, 32\), the model needs \(32, 128\)"):
        load_gpt2(None, source=write_tiny_gpt2(tmp_path / "b", tensors=t))
    t = hf_tensors()
    del t["h.1.ln_2.bias"]
    with pytest.raises(WeightsError, match="lacks 1 of the model's tensors \\(first: h.1.ln_2.bias\\)"):
        load_gpt2(None, source=write_tiny_gpt2(tmp_path / "c", tensors=t))
    t = hf_tensors()
    t["h.2.ln_1.weight"] = torch.ones(32)  # a third layer the config does not have
    with pytest.raises(WeightsError, match="has tensor 'h.2.ln_1.weight', which a GPT-2 does not"):
        load_gpt2(None, source=write_tiny_gpt2(tmp_path / "d", tensors=t))


def _hub_cache(monkeypatch, tmp_path) -> Path:
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_snapshot(cache: Path, repo_id: str) -> Path:
    """The Hugging Face cache layout: models--org--name/refs/main -> snapshots/<commit>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return write_tiny_gpt2(repo / "snapshots" / commit)


def test_offline_and_not_cached_is_one_line(monkeypatch, tmp_path):
    cache = _hub_cache(monkeypatch, tmp_path)
    with pytest.raises(WeightsError) as e:
        load_gpt2("gpt2-medium")
    msg = _one_line(e)
    assert "openai-community/gpt2-medium" in msg and "not in the Hugging Face cache" in msg
    assert str(cache) in msg and "HF_HUB_OFFLINE" in msg and "hf download" in msg


@pytest.mark.parametrize("repo_id", ["openai-community/gpt2", "gpt2"])
def test_loads_from_the_hub_cache_offline(monkeypatch, tmp_path, repo_id):
    cache = _hub_cache(monkeypatch, tmp_path)
    snapshot = _cache_snapshot(cache, repo_id)
    # the cache holds a tiny model under gpt2's name: let 'gpt2' have its shape for this test
    small = dict(n_layer=1, n_head=2, n_embd=16)
    monkeypatch.setitem(pretrained.GPT2_MODELS, "gpt2", small)
    with pytest.raises(WeightsError, match="vocab_size 97 \\(expected 50257\\)"):
        load_gpt2("gpt2")  # the published vocab and positions are still checked
    big = dict(small, vocab_size=50257, n_positions=1024)  # ~0.83M parameters
    write_tiny_gpt2(snapshot, tensors=hf_tensors(**big), config=hf_config(**big))
    model, args, source, _ = load_gpt2("gpt2")
    assert Path(source) == snapshot
    assert args == dict(small, vocab_size=50257, block_size=1024, bias=True, dropout=0.0)
    assert model.transformer.wte.weight.shape == (50257, 16)


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails as if not installed
    with pytest.raises(WeightsError, match=r"needs safetensors: pip install huggingface_hub safetensors tiktoken \(from an autofit checkout"):
        load_gpt2(None, source=tiny_dir)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(WeightsError, match=r"gpt2-xl from the Hugging Face hub needs huggingface_hub: pip install"):
        load_gpt2("gpt2-xl")


def test_crop_block_size_refuses_to_grow():
    from trainer.model.gpt import GPT, GPTConfig
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    with pytest.raises(ValueError, match="block_size can only shrink: 9 is not in 1..8"):
        m.crop_block_size(9)


def test_gpt2_config_refuses_a_shape_the_config_writes(monkeypatch):
    """t5's M1 (session 14): init_from = 'gpt2' dropped --set n_layer=3 and bias=False in silence
    (as nanoGPT does) while pos_emb='rope' was refused; a value a file or --set writes that the
    weights would replace is refused in one line. A preset's shape and GPT-2's own values are not."""
    from trainer.config.train_config import load_config
    from trainer.model.pretrained import gpt2_config
    cfg = gpt2_config(load_config("tiny", overrides=["init_from=gpt2", "n_layer=12", "block_size=64"]))
    assert (cfg.n_layer, cfg.n_embd, cfg.bias, cfg.vocab_size, cfg.block_size) == (12, 768, True, 50257, 64)
    assert cfg.source_of("n_embd") == "the gpt2 weights" and cfg.source_of("block_size") == "--set"
    with pytest.raises(WeightsError, match=r"n_layer=3 \(--set\), bias=False \(--set\) differ \(nanoGPT replaces"):
        gpt2_config(load_config("tiny", overrides=["init_from=gpt2", "n_layer=3", "bias=False"]))
    with pytest.raises(WeightsError, match=r"block_size=2048 \(--set; GPT-2 has 1024 positions\)"):
        gpt2_config(load_config("tiny", overrides=["init_from=gpt2", "block_size=2048"]))
    with pytest.raises(WeightsError, match=r"vocab_size=256 \(--set\)"):
        gpt2_config(load_config(None, overrides=["init_from=gpt2-medium", "vocab_size=256"]))


def test_a_failed_download_advises_what_run_can_follow(monkeypatch, tmp_path):
    """t5's M4 (session 14): offline, `run --set init_from=gpt2` said 'pass their directory', which
    only `sample --init-from DIR` takes; the advice is now the cache run reads (and how to move it)."""
    import huggingface_hub
    cache = _hub_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(repo_id, filename, local_files_only=False, **kw):
        raise (FileNotFoundError if local_files_only else ConnectionError)("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(WeightsError) as e:
        load_gpt2("gpt2")
    msg = _one_line(e)
    assert msg.startswith("cannot download openai-community/gpt2 from the Hugging Face hub (ConnectionError: no network)")
    assert f"put them in the Hugging Face cache ({cache})" in msg and "HF_HUB_CACHE" in msg and "directory" not in msg
