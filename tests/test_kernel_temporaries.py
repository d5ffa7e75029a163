"""Memory an op allocates inside its kernel, which no tracker of op outputs sees (the budgeted CPU
device counts only the storages of the ops it dispatches): the chunked loss makes none beyond its
logits. torch's profiler (profile_memory) reports every allocation, inner ones included."""
import torch
from torch.profiler import ProfilerActivity, profile

from trainer.model.gpt import chunked_cross_entropy


def test_the_chunked_loss_allocates_one_chunk_of_logits_and_no_hidden_copy():
    n, C, V = 64, 16, 4096  # one chunk of 64 rows: its fp32 logits are n*V*4 = 1 MiB
    torch.manual_seed(0)
    x = torch.randn(n, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (n,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = chunked_cross_entropy(x, w, t, chunk_size=n)
        loss.backward()
    big = [e.name for e in prof.events() if e.self_cpu_memory_usage >= n * V * 4]
    # torch.logsumexp's kernel made a second one, (self - max), inside aten::logsumexp (as aten::sub)
    assert big == ["aten::mm"], big
    ref = torch.nn.functional.cross_entropy(x.detach() @ w.detach().t(), t)
    assert torch.allclose(loss.detach(), ref, rtol=1e-5)


def test_the_budgeted_cpu_device_counts_logsumexps_hidden_copy():
    """What the CPU device can see of a kernel's own temporaries: torch.logsumexp's (self - max)."""
    import pytest

    from autofit.devices.cpu_budget import BudgetedCpuDevice
    dev = BudgetedCpuDevice(budget_bytes=1 << 30)
    with dev.tracking():
        x = torch.randn(256, 1024)  # 1 MiB
        dev.reset_peak()
        lse = torch.logsumexp(x, dim=-1)
        assert dev.peak_bytes() == 2 * x.nbytes  # x, and its copy for a moment (before the small output)
        del lse
    tight = BudgetedCpuDevice(budget_bytes=x.nbytes + 64 * 1024)  # x and the output fit, the copy not
    with tight.tracking():
        y = torch.randn(256, 1024)
        with pytest.raises(torch.OutOfMemoryError, match="internal temporary"):
            torch.logsumexp(y, dim=-1)
