import gc

import pytest
import torch

from autofit.devices.cpu_budget import BudgetedCpuDevice, LiveBytesTracker
from autofit.devices.device import DeviceError
from autofit.units import GiB, MiB
from trainer.meter import MemoryMeter, is_oom
from trainer.model.gpt import GPT, GPTConfig
from trainer.step import make_optimizer, train_step


def test_exact_bytes_views_and_frees():
    dev = BudgetedCpuDevice(1 * GiB)
    with dev.tracking():
        a = torch.empty(1000, dtype=torch.float32)
        assert dev.current_bytes() == 4000
        b = torch.zeros(10, 10, dtype=torch.float64)
        assert dev.current_bytes() == 4800
        v = a.view(10, 100)[2:5]  # views share the storage
        a.add_(1.0)                # in place: no new storage
        assert dev.current_bytes() == 4800
        del a
        assert dev.current_bytes() == 4800  # the view keeps the storage alive
        del v
        assert dev.current_bytes() == 800
        del b
    assert dev.current_bytes() == 0
    assert dev.peak_bytes() == 4800


def test_peak_and_reset():
    dev = BudgetedCpuDevice(1 * GiB)
    with dev.tracking():
        keep = torch.ones(100)            # 400 B
        tmp = torch.ones(1000)            # 4000 B
        del tmp
        assert dev.peak_bytes() == 4400 and dev.current_bytes() == 400
        dev.reset_peak()
        assert dev.peak_bytes() == 400
        x = keep * 2                      # 400 B result
        assert dev.peak_bytes() == 800
        del x, keep


def test_over_budget_raises_real_oom():
    dev = BudgetedCpuDevice(10_000)
    with dev.tracking():
        a = torch.empty(2000)  # 8000 B
        with pytest.raises(torch.OutOfMemoryError) as e:
            torch.empty(1000)  # +4000 B > 10000
        assert is_oom(e.value)
        assert "budgeted CPU device out of memory: tried to allocate 3.9 KiB; 7.8 KiB of 9.8 KiB budget in use" in str(e.value)
        del e
        assert dev.current_bytes() == 8000  # the refused tensor is not counted
        del a


def test_lowering_budget_midway():
    dev = BudgetedCpuDevice(1 * MiB)
    with dev.tracking():
        a = torch.empty(1000)
        b = torch.empty(1000)  # fits: 8000 of 1 MiB
        dev.budget_bytes = 10_000  # settable mid-run
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(1000)
        dev.budget_bytes = 12_000
        c = torch.empty(1000)  # exactly at the budget is allowed
        assert dev.current_bytes() == 12_000
        del a, b, c
    with pytest.raises(DeviceError):
        dev.budget_bytes = 0


def test_budgeted_device_is_a_memory_meter():
    dev: MemoryMeter = BudgetedCpuDevice(64 * MiB)
    info = dev.info
    assert info.kind == "cpu" and info.total_bytes == 64 * MiB


def test_default_budget_is_a_share_of_ram():
    dev = BudgetedCpuDevice()
    assert 0 < dev.budget_bytes


def test_tracking_is_reentrant():
    dev = BudgetedCpuDevice(1 * MiB)
    with dev.tracking():
        with dev.tracking():
            a = torch.empty(10)
        b = torch.empty(10)  # still tracked after the inner scope closed
        assert dev.current_bytes() == 80
        del a, b
    c = torch.empty(10)  # outside: not seen
    assert dev.current_bytes() == 0
    del c


def test_track_existing_tensors():
    lin = torch.nn.Linear(10, 5)  # built outside: 50 + 5 floats
    lin(torch.randn(3, 10)).sum().backward()
    opt = torch.optim.AdamW(lin.parameters())
    opt.step()
    t = LiveBytesTracker(1 * MiB)
    assert t.track_module(lin) == 2 * 55 * 4  # params + grads
    assert t.track_module(lin) == 0          # each storage once
    assert t.track_optimizer(opt) == 2 * 55 * 4 + 2 * 4  # exp_avg, exp_avg_sq, two step scalars
    small = LiveBytesTracker(100)
    with pytest.raises(torch.OutOfMemoryError):
        small.track_module(lin)
    assert small.live_bytes == 0  # all or nothing
    lin.weight.grad = None
    gc.collect()
    assert t.live_bytes == 55 * 4 + 5 * 4 + (2 * 55 * 4 + 8)  # the weight's grad was freed


@pytest.mark.parametrize("foreach", [False, True])
def test_linear_adamw_step_counts_grads_and_state(foreach):
    dev = BudgetedCpuDevice(1 * GiB)
    with dev.tracking():
        lin = torch.nn.Linear(64, 32)
        params = 64 * 32 * 4 + 32 * 4
        assert dev.current_bytes() == params
        opt = torch.optim.AdamW(lin.parameters(), foreach=foreach)
        x = torch.randn(8, 64)
        base = dev.current_bytes()
        assert base == params + x.nbytes
        dev.reset_peak()
        loss = lin(x).square().mean()
        loss.backward()  # backward ops run through dispatch too
        assert lin.weight.grad is not None
        del loss
        assert dev.current_bytes() == base + params  # grads; activations freed with the graph
        opt.step()
        # AdamW's exp_avg and exp_avg_sq per parameter, plus a 4-byte fp32 `step` per parameter.
        assert dev.current_bytes() == base + params + 2 * params + 2 * 4
        assert dev.peak_bytes() > dev.current_bytes()  # temporaries of the update
        opt.zero_grad(set_to_none=True)
        assert dev.current_bytes() == base + 2 * params + 2 * 4


def _gpt():
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))


def test_oom_inside_train_step_recovers_to_baseline():
    torch.manual_seed(0)
    dev = BudgetedCpuDevice(1 * GiB)
    oomed = False
    with dev.tracking():
        model = _gpt()
        opt = make_optimizer(model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                             device_type="cpu")
        x = torch.randint(0, 64, (4, 16))
        y = torch.randint(0, 64, (4, 16))
        train_step(model, opt, x, y, [2, 2])  # creates AdamW state; gradients set to None after
        dev.cleanup()
        baseline = dev.current_bytes()
        assert dev.peak_bytes() == baseline
        # Room for a little, not for a whole step: the OOM lands mid-forward or mid-backward.
        dev.budget_bytes = baseline + 64 * 1024
        try:
            train_step(model, opt, x, y, [4])
        except Exception as e:
            oomed = is_oom(e)
    # Cleanup outside the except block: the traceback no longer pins the failed step's tensors.
    assert oomed
    opt.zero_grad(set_to_none=True)
    dev.cleanup()
    assert dev.current_bytes() == baseline
    # And the run goes on within the budget with smaller micro-batches... once it has room.
    dev.budget_bytes = 1 * GiB
    with dev.tracking():
        r = train_step(model, opt, x, y, [1, 1, 1, 1])
    assert r.tokens == 64
    del r  # the step's result holds its loss on the device (read only when logged)
    dev.cleanup()
    assert dev.current_bytes() == baseline
