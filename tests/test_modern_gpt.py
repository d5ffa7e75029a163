"""Today's small-GPT options (RoPE, RMSNorm, QK-norm, ReLU^2/SwiGLU, GQA, untied embeddings, logit
soft-cap, Muon): each checked against an independent reference that a wrong implementation fails,
and the configs and checkpoints that carry them."""
import contextlib
import gc
import math

import pytest
import torch
import torch.nn.functional as F

from autofit.profiles.fingerprints import config_summary
from trainer.config.train_config import ConfigError, TrainConfig, load_config
from trainer.model import ce
from trainer.model.gpt import GPT, GPTConfig, model_args_of
from trainer.model.layers import CausalSelfAttention, MLP, apply_rope, mlp_hidden, rope_tables
from trainer.step import MuonAdamW, make_optimizer, train_step

TINY = dict(block_size=16, vocab_size=61, n_layer=2, n_head=4, n_embd=32)
MODERN = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", n_kv_head=2,
              tie_embeddings=False, logit_softcap=15.0)


def gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw}))


def batch(n=4, seed=1, ignore=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 61, (n, 16), generator=g), torch.randint(0, 61, (n, 16), generator=g)
    if ignore:
        y[0, :5] = -1
    return x, y


def reference_rope(x, base):
    """RoPE as a complex rotation: channel pair (i, i + D/2) is the number x_i + j x_{i+D/2},
    multiplied by exp(-j t base^(-2i/D)) at position t (RoFormer, eq. 34, nanochat's pairing)."""
    B, H, T, D = x.shape
    z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double())
    theta = torch.tensor([[t * base ** (-2 * i / D) for i in range(D // 2)] for t in range(T)], dtype=torch.float64)
    r = z * torch.polar(torch.ones_like(theta), -theta)
    return torch.cat([r.real, r.imag], dim=-1).float()


def test_rope_is_the_reference_rotation_and_depends_on_relative_position_only():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 8)
    cos, sin = rope_tables(10, 8, 500.0, "cpu")
    torch.testing.assert_close(apply_rope(x, cos, sin), reference_rope(x, 500.0), rtol=1e-5, atol=1e-5)
    # q at position p against k at position p': the score depends on p - p' only
    q, k = torch.randn(8), torch.randn(8)
    qs = apply_rope(q.expand(1, 1, 10, 8), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 10, 8), cos, sin)[0, 0]
    assert torch.allclose(qs[5] @ ks[2], qs[7] @ ks[4], atol=1e-5)
    assert not torch.allclose(qs[5] @ ks[2], qs[5] @ ks[4], atol=1e-3)


def reference_attention(m: CausalSelfAttention, x, rope_base=None, qk_norm=False):
    """Separate q/k/v from c_attn's rows, each K/V head repeated for its query heads, RoPE as a
    complex rotation, QK-norm as x / rms(x), softmax attention written out with a causal mask."""
    B, T, C = x.shape
    H, KV, D = m.n_head, m.n_kv_head, m.head_dim
    wq, wk, wv = m.c_attn.weight.split([H * D, KV * D, KV * D])
    q = (x @ wq.t()).view(B, T, H, D).transpose(1, 2)
    k = (x @ wk.t()).view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, dim=1)
    v = (x @ wv.t()).view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, dim=1)
    if rope_base:
        q, k = reference_rope(q, rope_base), reference_rope(k, rope_base)
    if qk_norm:
        eps = torch.finfo(torch.float32).eps
        q = q / (q.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        k = k / (k.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return y @ m.c_proj.weight.t()


@pytest.mark.parametrize("n_kv_head,rope,qk_norm", [(4, False, False), (2, False, False), (1, True, False),
                                                    (2, True, True), (4, False, True)])
def test_attention_equals_repeated_kv_reference(n_kv_head, rope, qk_norm):
    cfg = GPTConfig(**{**TINY, "n_kv_head": n_kv_head, "qk_norm": qk_norm})
    torch.manual_seed(0)
    m = CausalSelfAttention(cfg)
    assert m.c_attn.weight.shape == ((4 + 2 * n_kv_head) * 8, 32)  # GQA shrinks K and V's rows
    x = torch.randn(2, 12, 32)
    tables = rope_tables(12, 8, 10000.0, "cpu") if rope else None
    torch.testing.assert_close(m(x, tables), reference_attention(m, x, 10000.0 if rope else None, qk_norm),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "relu2", "swiglu"])
def test_mlp_activations(kind):
    cfg = GPTConfig(**{**TINY, "mlp": kind})
    torch.manual_seed(0)
    m = MLP(cfg)
    x = torch.randn(3, 32)
    h = x @ m.c_fc.weight.t()
    if kind == "relu2":
        h = torch.clamp(h, min=0) ** 2
    elif kind == "swiglu":
        hid = mlp_hidden(32, "swiglu")
        assert h.shape[-1] == 2 * hid and hid % 64 == 0 and hid >= 8 * 32 // 3
        h = h[:, :hid] * torch.sigmoid(h[:, :hid]) * h[:, hid:]
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    torch.testing.assert_close(m(x), h @ m.c_proj.weight.t(), rtol=1e-5, atol=1e-6)


def test_rmsnorm_is_parameter_free_and_untied_head_is_its_own_matrix():
    m = gpt(norm="rmsnorm", pos_emb="rope", tie_embeddings=False)
    names = set(dict(m.named_parameters()))
    assert not any(".ln_" in n or "ln_f" in n for n in names) and "transformer.wpe.weight" not in names
    assert m.lm_head.weight.data_ptr() != m.transformer.wte.weight.data_ptr()
    assert sum(p.numel() for p in m.parameters()) == 2 * 61 * 32 + 2 * (32 * 96 + 32 * 32 + 2 * 32 * 128)
    x = torch.randn(2, 5, 32) * 3
    torch.testing.assert_close(m.transformer.ln_f(x), x / (x.pow(2).mean(-1, keepdim=True)
                                                           + torch.finfo(torch.float32).eps).sqrt())
    # an untied model made empty (for loading weights) stays untied; a tied one stays tied
    assert GPT.empty(m.config).lm_head.weight.data_ptr() != GPT.empty(m.config).transformer.wte.weight.data_ptr()
    tied = GPT.empty(GPTConfig(**TINY))
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()


def reference_loss(x, w, t, cap):
    logits = (x.double() @ w.double().t())
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, t, ignore_index=-1)


@pytest.mark.parametrize("cap", [0.0, 15.0, 2.0])
@pytest.mark.parametrize("impl", ["standard", "chunked", "fallback"])
@pytest.mark.parametrize("ignore", [False, True])
def test_every_loss_path_equals_the_fp64_reference(cap, impl, ignore, monkeypatch):
    if impl == "fallback":  # a torch without F.linear_cross_entropy: the hand-written chunking
        monkeypatch.setattr(ce, "HAS_TORCH_LCE", False)
    torch.manual_seed(0)
    x = (torch.randn(45, 16) * 2).requires_grad_()
    w = torch.randn(70, 16, requires_grad=True)
    t = torch.randint(0, 70, (45,))
    if ignore:
        t[3:9] = -1
    loss = ce.lm_loss(x, w, t, impl="chunked" if impl != "standard" else "standard", chunk_size=7, cap=cap)
    gx, gw = torch.autograd.grad(loss, (x, w))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference_loss(xr, wr, t, cap)
    rx, rw = torch.autograd.grad(ref, (xr, wr))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ignore", [False, True])
def test_an_evaluations_bf16_chunked_loss_is_not_rounded_to_bf16(ignore):
    """torch's F.linear_cross_entropy returns its mean in bf16 under bf16 autocast (steps of 1/32
    near 7); without a gradient (evaluation: the val loss picks the best checkpoint) the loss is
    the fp32 mean of each token's, as the standard path gives it."""
    if not ce.HAS_TORCH_LCE:
        pytest.skip("this torch has no F.linear_cross_entropy")
    torch.manual_seed(0)
    x, w, t = torch.randn(4096, 32), torch.randn(500, 32) * 0.3, torch.randint(0, 500, (4096,))
    if ignore:
        t[:400] = -1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = ce.lm_loss(x, w, t, impl="chunked", chunk_size=512)
        standard = ce.lm_loss(x, w, t, impl="standard")
    assert chunked.dtype == torch.float32
    # each token's loss is rounded to bf16 once; 4096 of them average the rounding out (a bf16
    # mean is off by up to 2^-9 relative, 20x this)
    assert chunked.item() == pytest.approx(standard.item(), rel=2e-4)
    assert chunked.item() != torch.tensor(chunked.item()).bfloat16().item()  # not a bf16 value


def test_the_softcapped_chunked_loss_takes_no_gradient_in_evaluation(monkeypatch):
    """Under no_grad the hand-written chunking makes no V x C weight gradient (the head's weight
    still requires grad, and an autograd Function sees that)."""
    made = []
    real = ce._ChunkedLinearCrossEntropy.forward

    def spy(ctx, *a):
        made.append(ctx.needs_input_grad[:2])
        return real(ctx, *a)
    monkeypatch.setattr(ce._ChunkedLinearCrossEntropy, "forward", staticmethod(spy))
    x, w, t = torch.randn(20, 8), torch.randn(30, 8, requires_grad=True), torch.randint(0, 30, (20,))
    with torch.no_grad():
        loss = ce.lm_loss(x, w, t, impl="chunked", chunk_size=7, cap=15.0)
    want = ce.lm_loss(x, w, t, impl="standard", cap=15.0).detach()
    assert made == [(False, False)] and loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_chunked_path_names_what_runs(monkeypatch):
    assert "linear_cross_entropy" in ce.chunked_path(0.0) and "soft-cap 15" in ce.chunked_path(15.0)
    monkeypatch.setattr(ce, "HAS_TORCH_LCE", False)
    assert ce.chunked_path(0.0) == "autofit's chunked CE"


def test_softcapped_chunked_loss_never_holds_full_logits():
    """Neither the N x V logits nor their fp32 copy are saved for backward: only grad_x, grad_w."""
    m = gpt(**MODERN, loss_impl="chunked", ce_chunk_size=8)
    x, y = batch(4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        m(x, y)
    assert not [s for s in saved if len(s) and s[-1] == 61 and s.numel() > 8 * 61]


@pytest.mark.parametrize("kw", [MODERN, dict(mlp="swiglu", n_kv_head=1, pos_emb="rope"),
                                dict(norm="rmsnorm", logit_softcap=5.0)])
def test_model_loss_and_grads_equal_across_loss_impls(kw):
    grads = {}
    for impl in ("standard", "chunked"):
        m = gpt(**kw, loss_impl=impl, ce_chunk_size=5)
        x, y = batch(3, ignore=True)
        loss = m(x, y)
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close(grads["chunked"][0], grads["standard"][0], rtol=1e-5, atol=1e-6)
    for n, g in grads["standard"][1].items():
        torch.testing.assert_close(grads["chunked"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")
def test_muon_updates_block_matrices_as_torch_muon_and_the_rest_with_adamw():
    m = gpt(**MODERN)
    opt = make_optimizer(m, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                         optimizer="muon", muon_lr=0.05)
    assert isinstance(opt, MuonAdamW)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    fused = m.fused_rows()  # c_attn: Muon takes its Q, K and V rows as three matrices
    assert {n for n, p in named.items() if id(p) in muon_ids} | set(fused) == \
        {n for n, p in named.items() if n.startswith("transformer.h.") and p.dim() == 2}
    w = m.transformer.h[0].attn.c_attn.weight
    rows = fused["transformer.h.0.attn.c_attn.weight"]
    refs = [torch.nn.Parameter(b.clone()) for b in w.detach().split(rows)]  # nanochat's c_q, c_k, c_v
    ref = torch.optim.Muon(refs, lr=0.05 * 0.5, weight_decay=0.1, momentum=0.95, nesterov=True)
    head_before = m.lm_head.weight.detach().clone()
    x, y = batch(2)
    for _ in range(2):
        for g in opt.param_groups:  # what the training loop does with the schedule's lr (half here)
            g["lr"] = 1e-3 * 0.5 * g.get("lr_scale", 1.0)
        m.zero_grad()
        m(x, y).backward()
        for r, gb in zip(refs, w.grad.split(rows)):
            r.grad = gb.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(w.detach(), torch.cat([r.detach() for r in refs]), rtol=1e-5, atol=1e-6)
    assert len(opt.muon.state) == len(muon_ids)  # one momentum buffer per block matrix
    assert all(set(st) == {"momentum_buffer"} for st in opt.muon.state.values())
    assert {"exp_avg", "exp_avg_sq"} <= set(opt.state[m.lm_head.weight])
    assert not torch.equal(m.lm_head.weight, head_before)
    # state dict round trip: a fresh optimizer continues with the same momentum
    opt2 = make_optimizer(gpt(**MODERN), learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                          device_type="cpu", optimizer="muon", muon_lr=0.05)
    opt2.load_state_dict(opt.state_dict())
    for a, b in zip(opt2.muon.state.values(), opt.muon.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    with pytest.raises(ValueError, match="Muon"):
        opt2.load_state_dict(torch.optim.AdamW(m.parameters()).state_dict())


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")
def test_muon_adamw_is_an_optimizer_for_schedulers_hooks_and_grad_scaler():
    """What a user does with an optimizer works on Muon + AdamW: a torch LR scheduler (it refuses
    anything but a torch.optim.Optimizer) reaches both parts, step hooks fire, GradScaler unscales
    every group and skips the whole step on an inf, zero_grad(set_to_none) clears every gradient,
    and after load_state_dict the groups are still the parts' own."""
    def fresh():
        m = gpt(**MODERN)
        return m, make_optimizer(m, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                                 optimizer="muon", muon_lr=0.05)
    m, opt = fresh()
    assert isinstance(opt, torch.optim.Optimizer)
    steps = []
    opt.register_step_post_hook(lambda o, args, kwargs: steps.append(1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    x, y = batch(2)
    m(x, y).backward()
    calls = []
    opt.step(lambda: calls.append(1))  # a closure runs once
    sched.step()
    assert (len(steps), len(calls)) == (1, 1)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    assert [g["lr"] for g in opt.adamw.param_groups] == pytest.approx([1e-3 * 0.5] * 2)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m.parameters())
    # GradScaler: unscale_ divides every group's gradients; an inf in a Muon matrix skips both parts
    m, opt = fresh()
    m(x, y).backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(m(x, y)).backward()
    scaler.unscale_(opt)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    scaler.step(opt)  # finite: both parts step
    scaler.update()
    assert not torch.equal(m.transformer.h[0].attn.c_attn.weight, before["transformer.h.0.attn.c_attn.weight"])
    assert not torch.equal(m.lm_head.weight, before["lm_head.weight"])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.zero_grad()
    scaler.scale(m(x, y)).backward()
    m.transformer.h[0].attn.c_attn.weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # unscale_ finds the inf: neither part steps
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert scaler.get_scale() < 2.0 ** 10
    # after a load, setting a group's lr (as the training loop does) still reaches its part
    _, opt2 = fresh()
    opt2.load_state_dict(opt.state_dict())
    opt2.param_groups[0]["lr"], opt2.param_groups[-1]["lr"] = 0.123, 0.456
    assert (opt2.muon.param_groups[0]["lr"], opt2.adamw.param_groups[-1]["lr"]) == (0.123, 0.456)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")
def test_modern_model_trains_with_muon():
    m = gpt(**MODERN)
    opt = make_optimizer(m, learning_rate=3e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu",
                         optimizer="muon", muon_lr=0.02)
    x, y = batch(4)
    losses = [train_step(m, opt, x, y, [2, 2]).loss for _ in range(8)]
    assert losses[-1] < losses[0] - 0.3


def one_line(**kw):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_invalid_combinations_are_one_line(monkeypatch):
    assert "n_kv_head (3) must divide n_head (4)" in one_line(n_head=4, n_embd=32, n_kv_head=3)
    assert "n_kv_head (8) must divide" in one_line(n_head=4, n_embd=32, n_kv_head=8)
    assert "must be even" in one_line(n_head=4, n_embd=36, pos_emb="rope")
    assert "init_from 'gpt2'" in one_line(init_from="gpt2", norm="rmsnorm")
    assert "fsdp2" in one_line(optimizer="muon", parallelism="fsdp2")
    assert "logit_softcap" in one_line(logit_softcap=-1.0)
    assert "mlp" in one_line(mlp="geglu")
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    assert "needs torch.optim.Muon" in one_line(optimizer="muon")


def test_options_from_toml_py_and_set(tmp_path):
    (tmp_path / "m.toml").write_text('pos_emb = "rope"\nn_kv_head = 2\nn_head = 4\nn_embd = 32\nlogit_softcap = 15\n'
                                     'dataset = "embedded"\n')
    (tmp_path / "m.py").write_text("pos_emb = 'rope'\nn_kv_head = 2\nn_head = 4\nn_embd = 32\nmlp = 'swiglu'\n"
                                   "tie_embeddings = False\ndataset = 'embedded'\n")
    a = load_config(config_file=tmp_path / "m.toml")
    b = load_config(config_file=tmp_path / "m.py")
    c = load_config(overrides=["pos_emb=rope", "n_kv_head=2", "n_head=4", "n_embd=32", "qk_norm=true",
                               "tie_embeddings=False", "optimizer=muon", "dataset=embedded"])
    assert (a.pos_emb, a.n_kv_head, a.logit_softcap) == ("rope", 2, 15.0)
    assert (b.mlp, b.tie_embeddings) == ("swiglu", False)
    assert (c.qk_norm, c.tie_embeddings, c.optimizer) == (True, False, "muon")
    assert "n_kv_head" not in config_summary(TrainConfig()) and config_summary(c)["n_kv_head"] == 2


def test_nanochat_preset_fixes_its_vocabulary():
    cfg = load_config(preset="nanochat-d12")
    assert (cfg.vocab_size, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size) == (32768, 6, 128, 2048)
    assert cfg.tokens_per_step == 2 ** 19 and cfg.optimizer == "muon" and cfg.logit_softcap == 15.0


def test_model_args_carry_the_options_and_gpt2_keeps_nanogpts_seven():
    assert set(model_args_of(TrainConfig())) == {"n_layer", "n_head", "n_embd", "block_size", "bias",
                                                 "vocab_size", "dropout"}
    args = model_args_of(TrainConfig(**TINY, **MODERN))
    assert {k: args[k] for k in MODERN} == MODERN
    m = GPT(GPTConfig(**args))  # sample.py and the checkpoint readers rebuild the model from these
    assert set(m.state_dict()) == set(gpt(**MODERN).state_dict())
    # a nanoGPT checkpoint's seven args build GPT-2 (learned positions, tied)
    nano = GPT(GPTConfig(**model_args_of(TrainConfig(**TINY))))
    assert "transformer.wpe.weight" in nano.state_dict() and nano.config.tie_embeddings


class _CountMM(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matmul calls (aten.mm / addmm / bmm) while active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [{}, MODERN])
def test_selective_checkpointing_saves_matmuls_and_recomputes_the_rest(kw):
    from autofit.devices.cpu_budget import BudgetedCpuDevice
    x, y = batch(4)
    runs = {}
    for name, ck, policy in [("none", 0, "full"), ("full", 1, "full"), ("selective", 1, "selective")]:
        m = gpt(**kw, checkpointing=ck, checkpointing_policy=policy)
        dev = BudgetedCpuDevice(budget_bytes=1 << 40)
        with dev.tracking():
            loss = m(x, y)
            saved = dev.current_bytes()  # what the forward keeps for backward (and the loss)
        counter = _CountMM()
        with counter:
            loss.backward()
        runs[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()}, saved, counter.n)
    for name in ("full", "selective"):  # the same loss and gradients as without checkpointing
        torch.testing.assert_close(runs[name][0], runs["none"][0])
        for n, g in runs["none"][1].items():
            torch.testing.assert_close(runs[name][1][n], g, rtol=1e-5, atol=1e-6, msg=n)
    # memory between none and full; no matmul recomputed by the selective policy, some by full
    assert runs["full"][2] < runs["selective"][2] < runs["none"][2]
    assert runs["selective"][3] == runs["none"][3] < runs["full"][3]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")
def test_nanogpt_style_ckpt_of_a_modern_model_reads_back(tmp_path):
    """sample and the nanoGPT-layout reader rebuild the model from the ckpt.pt's model_args (with
    the options) and accept Muon + AdamW's optimizer state."""
    from trainer.checkpoint.nanogpt import nanogpt_keys, read_nanogpt_checkpoint
    cfg = TrainConfig(**TINY, **MODERN, optimizer="muon")
    m = gpt(**MODERN)
    opt = make_optimizer(m, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                         optimizer="muon")
    x, y = batch(2)
    train_step(m, opt, x, y, [2])
    torch.save(nanogpt_keys(m, opt, cfg, 1, 2.0, {"dataset": "embedded"}), tmp_path / "ckpt.pt")
    ck = read_nanogpt_checkpoint(tmp_path / "ckpt.pt")
    assert {k: ck.model_args[k] for k in MODERN} == MODERN
    m2 = GPT(GPTConfig(**ck.model_args))
    m2.load_state_dict(ck.model, strict=True)
    torch.testing.assert_close(m2(x), m(x))


def test_plan_words_name_the_model_options():
    from autofit.report.render import model_words
    assert model_words(TrainConfig()).startswith("GPT-2 (learned positions")
    words = model_words(load_config(preset="nanochat-d12", overrides=["n_kv_head=2"]))
    for w in ("rope (base 100000)", "rmsnorm", "qk-norm", "relu2 MLP", "2 of 6 heads for K/V (GQA)",
              "untied embeddings", "soft-capped at 15", "Muon"):
        assert w in words, w


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")
def test_a_resumed_muon_run_follows_the_lr_schedule(tmp_path):
    """A Muon run stopped and resumed trains as the uninterrupted one: the schedule's lr reaches both
    parts after the optimizer state is loaded (their group dicts are rebuilt by the load)."""
    from trainer.loop import RunOptions, train

    def cfg(out):
        sets = dict(n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=4, gradient_accumulation_steps=1,
                    dataset="embedded", out_dir=str(out), max_iters=6, warmup_iters=1, lr_decay_iters=6,
                    learning_rate=3e-3, min_lr=1e-4, eval_interval=0, compile=False, device="cpu", dtype="float32",
                    optimizer="muon", muon_lr=0.05, **{k: v for k, v in MODERN.items() if k != "n_kv_head"})
        return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in sets.items()])
    opts = dict(device=torch.device("cpu"), progress=False)
    whole = train(cfg(tmp_path / "whole"), RunOptions(**opts))
    first = train(cfg(tmp_path / "split"), RunOptions(max_steps=3, **opts))
    rest = train(cfg(tmp_path / "split"), RunOptions(resume=True, **opts))
    assert first.losses + rest.losses == pytest.approx(whole.losses, rel=1e-6, abs=0)
    # Muon's rate is logged beside AdamW's (only AdamW's was shown)
    import json
    from trainer.metrics import describe_step
    recs = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r.get("type") == "train"]
    assert train_recs and all(r["muon_lr"] == pytest.approx(r["lr"] * 0.05 / 3e-3) for r in train_recs)
    assert f"(Muon {train_recs[-1]['muon_lr']:.2e})" in describe_step(train_recs[-1])


def test_muon_lr_given_for_another_optimizer_is_refused_but_a_presets_is_not():
    # muon_lr does nothing under AdamW: a user who sets it has a config that does not say what it trains
    with pytest.raises(ConfigError, match=r"muon_lr \(--set\) is torch.optim.Muon's learning rate.*optimizer is 'adamw'"):
        load_config(overrides=["muon_lr=0.01"])
    assert load_config(preset="nanochat-d12", overrides=["optimizer=adamw"]).optimizer == "adamw"
    assert load_config(overrides=["optimizer=muon", "muon_lr=0.01"]).muon_lr == 0.01



def test_rope_base_given_without_rotary_positions_is_refused_but_a_presets_is_not():
    # it was saved in the config and left out of the model: the run trained learned positions
    with pytest.raises(ConfigError, match=r"rope_base \(--set\) is the rotary positions' base.*pos_emb is 'learned'"):
        load_config(overrides=["rope_base=500"])
    assert load_config(preset="nanochat-d12", overrides=["pos_emb=learned"]).pos_emb == "learned"
    assert load_config(overrides=["pos_emb=rope", "rope_base=500"]).rope_base == 500


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")
def test_a_muon_state_saved_with_one_buffer_per_fused_matrix_loads_block_by_block():
    """Checkpoints written before Muon took c_attn's Q, K and V apart hold one momentum buffer for
    the fused matrix: it loads as its blocks' buffers, row for row."""
    m = gpt(**MODERN)
    m.fused_rows = lambda: {}  # as before: every block matrix one Muon parameter
    old = make_optimizer(m, learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu",
                         optimizer="muon", muon_lr=0.02)
    del m.fused_rows
    x, y = batch(2)
    m(x, y).backward()
    old.step()
    saved = old.state_dict()
    new = make_optimizer(m, learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu",
                         optimizer="muon", muon_lr=0.02)
    new.load_state_dict(saved)
    w = m.transformer.h[0].attn.c_attn.weight
    fused_buf = old.muon.state[w]["momentum_buffer"]
    views = next(vs for p, vs in new.fused if p is w)
    pieces = fused_buf.split([v.shape[0] for v in views])
    for v, piece in zip(views, pieces):
        assert torch.equal(new.muon.state[v]["momentum_buffer"], piece)
    assert len(new.muon.state) == len(new.muon.param_groups[0]["params"])


class BucketSwap:
    """A stand-in for DDP's wrapper (trainer.distributed.sharding): at the sync it puts a copy of
    each gradient in place of the one backward made, as DDP's reducer puts its bucket view there,
    and asks whether anything still holds the replaced gradients."""
    zero_grad_to_none = False

    def __init__(self, model, opt):
        self.model, self.opt, self.held = model, opt, []

    def micro_batch(self, last):
        return contextlib.nullcontext()

    def finish(self):
        old = {id(p.grad) for p, _ in self.opt.fused if p.grad is not None}
        bases = {id(v.grad._base) for _, vs in self.opt.fused for v in vs if v.grad is not None}
        self.held.append(len(old & bases))  # views of the gradients about to be replaced
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad = p.grad.clone()


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")
def test_muon_views_hold_no_gradient_a_sync_or_a_rewrap_replaces():
    """Several ranks: the block views were linked during backward to the gradient DDP then
    replaced by its bucket (a second copy of every fused gradient through the all-reduce), and kept
    DDP's old bucket alive past a rewrap (compile switching on, a thrash shrink). Now they are
    linked after the sync, unlinked by zero_grad, and the update is the same."""
    def run(sync):
        m = gpt(**MODERN)
        opt = make_optimizer(m, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                             optimizer="muon", muon_lr=0.05)
        swap = BucketSwap(m, opt) if sync else None
        x, y = batch(4)
        for _ in range(3):
            train_step(m, opt, x, y, [2, 2], sync_grads=swap)
            assert all(v.grad is None for _, vs in opt.fused for v in vs)  # nothing kept between steps
        return m, swap
    synced, swap = run(True)
    assert swap.held == [0, 0, 0]
    plain, _ = run(False)
    for (n, a), b in zip(synced.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without torch.optim.Muon")
def test_a_dropped_muon_optimizer_stops_linking_its_views():
    m = gpt(**MODERN)
    first = make_optimizer(m, learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu",
                           optimizer="muon", muon_lr=0.05)
    old_views = [v for _, vs in first.fused for v in vs]
    del first
    gc.collect()
    x, y = batch(2)
    m(x, y).backward()
    assert all(v.grad is None for v in old_views)  # its hooks went with it: the gradients are not held
