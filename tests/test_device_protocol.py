"""Every device implements one protocol, and one function opens them for every caller."""
import pytest
import torch

import autofit.devices.cuda as cuda
from autofit.devices.cpu import PlainCpuDevice
from autofit.devices.cpu_budget import BudgetedCpuDevice
from autofit.devices.cuda import CudaDevice
from autofit.devices.device import Device, DeviceError
from autofit.devices.opener import open_device, open_simulated, reopen_device
from trainer.meter import MeterCapabilities


def test_every_device_is_a_device():
    for dev in (BudgetedCpuDevice(budget_bytes=1 << 30), PlainCpuDevice(), open_simulated("rtx4070-12gb")):
        assert isinstance(dev, Device)
        assert isinstance(dev.capabilities, MeterCapabilities)
        assert dev.info.kind in ("cpu", "simulated")
    assert issubclass(CudaDevice, object) and CudaDevice.capabilities.reserved


def test_declared_capabilities_match_the_readings():
    b = BudgetedCpuDevice(budget_bytes=1 << 30)
    assert b.capabilities.measures and not b.capabilities.reserved and not b.capabilities.compile
    with b.tracking():
        x = torch.ones(1000)
    assert b.peak_bytes() >= 4000 and b.peak_reserved_bytes() is None and b.alloc_retries() is None
    del x
    p = PlainCpuDevice()
    assert not p.capabilities.measures and p.peak_bytes() is None and p.capabilities.compile
    s = open_simulated("t4-16gb")
    assert not s.runs_trials and s.info.source == "profile:t4-16gb"


def test_open_device_picks_the_cpu_devices(monkeypatch):
    assert isinstance(open_device("cpu", budget_bytes=1 << 20), BudgetedCpuDevice)
    assert isinstance(open_device(None, budget_bytes=1 << 20), BudgetedCpuDevice)
    assert isinstance(open_device("cpu"), BudgetedCpuDevice)  # probing needs measurements
    assert isinstance(open_device("cpu", cpu="plain"), PlainCpuDevice)

    def no_gpu(index=0):
        raise DeviceError("no NVIDIA GPU found")
    monkeypatch.setattr(cuda, "detect_gpu", no_gpu)
    assert isinstance(open_device(None), BudgetedCpuDevice)
    assert isinstance(open_device(None, cpu="plain"), PlainCpuDevice)
    with pytest.raises(DeviceError, match="no NVIDIA GPU"):
        open_device("cuda")
    with pytest.raises(DeviceError, match="CPU device only"):
        open_device("cuda", budget_bytes=1 << 20)
    with pytest.raises(DeviceError, match="--device"):
        open_device("tpu")


def test_reopen_from_a_checkpoint_spec():
    dev = reopen_device(BudgetedCpuDevice(budget_bytes=12345678).spec())
    assert isinstance(dev, BudgetedCpuDevice) and dev.budget_bytes == 12345678
    assert isinstance(reopen_device(PlainCpuDevice().spec()), PlainCpuDevice)
