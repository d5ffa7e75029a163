from pathlib import Path

import pytest

from autofit.devices.device import DeviceError, DeviceInfo, simulated_info
from autofit.devices.hardware import (HardwareError, HardwareSpec, cpu_slug, get_hardware, load_builtin,
                              load_hardware_file, match_hardware, slug_for)
from autofit.units import GiB, MiB

PROFILES = sorted((Path(__file__).parent.parent / "profiles").glob("*.toml"))
SHIPPED = {"rtx4070-12gb", "rtx3060-12gb", "rtx4060ti-16gb", "rtx3090-24gb", "rtx4090-24gb",
           "l4-24gb", "t4-16gb", "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_builtin_file_validates(path):
    spec = load_hardware_file(path)
    assert spec.name == path.stem
    assert spec.nvml_names
    # Each profile's own NVML name and total map back to it: slugs and files agree.
    assert slug_for(spec.nvml_names[0], spec.memory_bytes) == spec.name


def test_builtin_set():
    specs = load_builtin()
    assert set(specs) == SHIPPED
    assert specs["t4-16gb"].bf16 is False and specs["t4-16gb"].compute_capability == (7, 5)
    assert specs["t4-16gb"].peak_bf16_tflops is None
    assert specs["rtx4070-12gb"].memory_bytes == 12282 * MiB
    assert specs["rtx4070-12gb"].compute_capability == (8, 9)
    # Not the A100's 312 for every card.
    assert specs["rtx4070-12gb"].peak_bf16_tflops < 100 < specs["a100-80gb"].peak_bf16_tflops


@pytest.mark.parametrize("name,mib,slug", [
    ("NVIDIA GeForce RTX 4070", 12282, "rtx4070-12gb"),
    ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb"),
    ("NVIDIA H100 80GB HBM3", 81559, "h100-80gb"),
    ("Tesla T4", 15360, "t4-16gb"),
    ("NVIDIA L4", 23034, "l4-24gb"),
    ("NVIDIA GeForce RTX 4060 Ti", 16380, "rtx4060ti-16gb"),
    ("NVIDIA H200", 143771, "h200-141gb"),
    ("NVIDIA GeForce RTX 3090", 24576, "rtx3090-24gb"),
    ("NVIDIA H100 PCIe", 81559, "h100pcie-80gb"),  # other clocks than SXM: its own slug
    ("NVIDIA GeForce RTX 4070 Ti SUPER", 16376, "rtx4070tisuper-16gb"),
])
def test_slug_for(name, mib, slug):
    assert slug_for(name, mib * MiB) == slug


def test_unknown_name_suggests_nearest():
    with pytest.raises(HardwareError, match=r"did you mean rtx4070-12gb") as e:
        get_hardware("rtx4070-16gb")
    assert "known:" in str(e.value) and "h200-141gb" in str(e.value)
    assert isinstance(e.value, DeviceError)  # the CLI catches one family of user errors
    # t5 (session 14): a name nothing is close to got 'did you mean h200-141gb?' (the '-' and 'gb' alone)
    with pytest.raises(HardwareError) as e:
        get_hardware("nosuch-4gb")
    assert "did you mean" not in str(e.value) and "known:" in str(e.value)
    with pytest.raises(HardwareError, match=r"did you mean rtx4070-12gb\?"):
        get_hardware("4070")  # the card without its memory


def test_newer_schema_version_names_the_file(tmp_path):
    text = (PROFILES[0].read_text()).replace("schema_version = 1", "schema_version = 2")
    p = tmp_path / PROFILES[0].name
    p.write_text(text)
    with pytest.raises(HardwareError, match=rf"{p.name}: schema_version 2 is newer"):
        load_hardware_file(p)


def test_bad_profile_errors(tmp_path):
    good = (Path(PROFILES[0])).read_text()
    typo = tmp_path / PROFILES[0].name
    typo.write_text(good + 'colour = "green"\n')
    with pytest.raises(HardwareError, match="colour"):
        load_hardware_file(typo)
    wrong_name = tmp_path / "other-12gb.toml"
    wrong_name.write_text(good)
    with pytest.raises(HardwareError, match="file name must match"):
        load_hardware_file(wrong_name)
    broken = tmp_path / "x.toml"
    broken.write_text("name = ")
    with pytest.raises(HardwareError, match="not valid TOML"):
        load_hardware_file(broken)


def test_bf16_needs_ampere():
    spec = get_hardware("t4-16gb").model_dump()
    spec.update(bf16=True, peak_bf16_tflops=65.0)
    with pytest.raises(ValueError, match="8.0"):
        HardwareSpec.model_validate(spec)


def _cuda_info(name, total):
    return DeviceInfo(kind="cuda", name=name, index=0, total_bytes=total, free_bytes=total,
                      used_by_others_bytes=0, compute_capability=(8, 9), driver_version="550",
                      cuda_version="12.4", source="nvml")


def test_match_hardware():
    assert match_hardware(_cuda_info("NVIDIA GeForce RTX 4070", 12282 * MiB)).name == "rtx4070-12gb"
    assert match_hardware(_cuda_info("NVIDIA GeForce RTX 4070", 8 * GiB)) is None  # no 8 GB 4070 profile
    assert match_hardware(_cuda_info("NVIDIA RTX 6000 Ada Generation", 49140 * MiB)) is None
    sim = simulated_info(get_hardware("l4-24gb"))
    assert sim.kind == "simulated" and sim.source == "profile:l4-24gb" and sim.free_bytes == sim.total_bytes
    assert match_hardware(sim).name == "l4-24gb"


def test_cpu_slug():
    assert cpu_slug(2 * GiB) == "cpu-2gb"
    assert cpu_slug(512 * MiB) == "cpu-512mb"
    assert cpu_slug(1536 * MiB) == "cpu-1536mb"
    with pytest.raises(HardwareError):
        cpu_slug(0)
