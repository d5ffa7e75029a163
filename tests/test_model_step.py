import torch

from trainer.model.gpt import GPT, GPTConfig, clean_state_dict
from trainer.step import FaultInjector, describe_split, make_optimizer, split_batch, train_step

TINY = dict(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32)


def model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw}))


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 61, (n, 16), generator=g)
    y = torch.randint(0, 61, (n, 16), generator=g)
    return x, y


def test_nanogpt_state_dict_names_and_shapes():
    m = model(bias=True)
    sd = m.state_dict()
    C = 32
    expected = {
        "transformer.wte.weight": (61, C), "transformer.wpe.weight": (16, C),
        "transformer.h.0.ln_1.weight": (C,), "transformer.h.0.ln_1.bias": (C,),
        "transformer.h.0.attn.c_attn.weight": (3 * C, C), "transformer.h.0.attn.c_attn.bias": (3 * C,),
        "transformer.h.0.attn.c_proj.weight": (C, C), "transformer.h.1.ln_2.weight": (C,),
        "transformer.h.1.mlp.c_fc.weight": (4 * C, C), "transformer.h.1.mlp.c_proj.weight": (C, 4 * C),
        "transformer.ln_f.weight": (C,), "lm_head.weight": (61, C),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    # tied embeddings, as nanoGPT
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    # a compiled nanoGPT checkpoint (with _orig_mod. and old causal-mask buffers) loads strictly
    foreign = {"_orig_mod." + k: v.clone() + 1 for k, v in sd.items()}
    foreign["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)
    m2 = model(bias=True)
    m2.load_state_dict(clean_state_dict(foreign), strict=True)
    assert torch.equal(m2.transformer.h[1].mlp.c_fc.weight, sd["transformer.h.1.mlp.c_fc.weight"] + 1)


def grads_after(loss_impl, chunk=5, ignore=False):
    m = model(loss_impl=loss_impl, ce_chunk_size=chunk)
    x, y = batch(3)
    if ignore:
        y[0, :7] = -1
    loss = m(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def test_chunked_cross_entropy_equals_standard():
    for ignore in (False, True):
        l1, g1 = grads_after("standard", ignore=ignore)
        l2, g2 = grads_after("chunked", chunk=5, ignore=ignore)  # 48 rows: ragged last chunk
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        for n in g1:
            torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_training_forward_returns_only_the_loss():
    m = model(loss_impl="standard")
    x, y = batch(2)
    out = m(x, y)
    assert out.dim() == 0

    def saved_vocab_sized(m):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            m(x, y)
        return [s for s in saved if len(s) and s[-1] == 61 and s.numel() >= 2 * 16 * 61]

    # the standard loss keeps B*T x V tensors for backward; the chunked one keeps none
    assert saved_vocab_sized(model(loss_impl="standard"))
    assert not saved_vocab_sized(model(loss_impl="chunked", ce_chunk_size=4))


def test_checkpointing_same_gradients():
    x, y = batch(2)
    res = []
    for k in (0, 1, 2):
        m = model(checkpointing=k)
        m(x, y).backward()
        res.append(m.transformer.h[0].mlp.c_fc.weight.grad.clone())
    torch.testing.assert_close(res[1], res[0])
    torch.testing.assert_close(res[2], res[0])


def test_split_batch_exact_and_balanced():
    assert split_batch(512, 42) == [40] * 5 + [39] * 8  # 13 micro-batches either way, none tiny
    assert describe_split(split_batch(512, 42)) == "512 = 40 × 5 + 39 × 8"
    assert split_batch(512, 27) == [27] * 18 + [26]
    assert describe_split(split_batch(512, 27)) == "512 = 27 × 18 + 26"
    assert split_batch(21, 10) == [7, 7, 7]  # not [10, 10, 1]
    assert split_batch(8, 3) == [3, 3, 2]
    assert split_batch(7, 16) == [7]
    for eff in (480, 500, 7, 1):
        for mb in (1, 3, 7, 16, 64):
            s = split_batch(eff, mb)
            assert sum(s) == eff and max(s) <= mb and max(s) - min(s) <= 1
            assert len(s) == -(-eff // min(mb, eff))  # no more micro-batches than the ragged split


def one_step(micro_batches):
    m = model()
    opt = make_optimizer(m, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    x, y = batch(8)
    grads = {}
    # capture grads just before the optimizer consumes them
    orig = opt.step

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in m.named_parameters()})
        return orig(*a, **k)
    opt.step = capture
    res = train_step(m, opt, x, y, micro_batches, dtype="float32", grad_clip=0.0)
    return res, grads, {n: p.detach().clone() for n, p in m.named_parameters()}


def test_ragged_accumulation_equals_one_batch():
    r1, g1, p1 = one_step([8])
    r2, g2, p2 = one_step([3, 3, 2])
    assert abs(r1.loss - r2.loss) <= 1e-5 * abs(r1.loss)
    assert r1.tokens == r2.tokens == 8 * 16
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)


def test_fault_injector_fires_once_at_step():
    m = model()
    opt = make_optimizer(m, learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu")
    x, y = batch(4)
    f = FaultInjector(3)
    train_step(m, opt, x, y, [2, 2], step=2, fault=f)
    try:
        train_step(m, opt, x, y, [2, 2], step=3, fault=f)
        raise AssertionError("no OOM injected")
    except torch.OutOfMemoryError:
        pass
    opt.zero_grad(set_to_none=True)
    train_step(m, opt, x, y, [2, 2], step=3, fault=f)  # fires once only


def test_is_oom_sees_through_compiler_wrapping():
    from trainer.meter import is_oom
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend='inductor' raised: see above") from inner
    except RuntimeError as outer:
        assert is_oom(outer)
    assert is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))  # only runtime errors carry allocator messages
