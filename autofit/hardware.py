"""Hardware profiles: what a GPU model can hold and do, from vendor figures.

A profile is named by a slug, model + marketed memory ("rtx4070-12gb"), and lives in a TOML file
(autofit/builtin_profiles/<slug>.toml for the built-in ones). It gives the capacity, compute
capability, bf16 support, peak dense tensor throughput (for honest MFU, per card) and memory
bandwidth. The simulated device uses a profile in place of a GPU that is not present.
"""
from __future__ import annotations

import difflib
import re
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autofit.device import DeviceError, DeviceInfo
from autofit.units import GiB, MiB

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pyproject installs tomli on 3.10
    import tomli as tomllib

SCHEMA_VERSION = 1


class HardwareError(DeviceError):
    """A bad or unknown hardware profile. One line, names the file or the profile."""


class HardwareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a profile is an error, not a silent default

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.]*-[0-9]+(gb|mb)$")
    gpu: str  # marketing name
    nvml_names: list[str]  # names NVML reports for this card
    memory_bytes: int = Field(gt=0)  # typical NVML total where known, else the vendor figure
    compute_capability: tuple[int, int]
    bf16: bool
    # Dense (no sparsity) tensor-core TFLOP/s, with FP32 accumulation: that is what PyTorch's bf16
    # and fp16 matmuls use. GeForce cards run FP32-accumulate at half their FP16-accumulate rate,
    # so their figure is the whitepaper's "with FP32 Accumulate" column. None: no bf16 tensor cores.
    peak_bf16_tflops: float | None = Field(default=None, gt=0)
    peak_fp16_tflops: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0)  # GB/s, decimal, as vendors state it
    source: str  # where the figures come from

    @model_validator(mode="after")
    def _consistent(self) -> HardwareSpec:
        if self.bf16 and self.peak_bf16_tflops is None:
            raise ValueError("bf16 = true needs peak_bf16_tflops")
        if self.bf16 and tuple(self.compute_capability) < (8, 0):
            raise ValueError("bf16 tensor cores need compute capability 8.0 or newer")
        return self


def load_hardware_file(path: str | Path) -> HardwareSpec:
    """Read and validate one profile TOML; every failure is a HardwareError naming the file."""
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HardwareError(f"{path}: cannot read hardware profile ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise HardwareError(f"{path}: not valid TOML ({e})") from None
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise HardwareError(f"{path}: schema_version {version} is newer than this autofit reads "
                            f"({SCHEMA_VERSION}); upgrade autofit")
    try:
        spec = HardwareSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "profile"
        raise HardwareError(f"{path}: invalid hardware profile: {where}: {err['msg']}") from None
    if path.suffix == ".toml" and path.stem != spec.name:
        raise HardwareError(f"{path}: file name must match the profile name {spec.name!r}")
    return spec


@lru_cache(maxsize=1)
def _builtin() -> tuple[HardwareSpec, ...]:
    folder = resources.files("autofit") / "builtin_profiles"
    specs = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            with resources.as_file(entry) as p:
                specs.append(load_hardware_file(p))
    return tuple(specs)


def load_builtin() -> dict[str, HardwareSpec]:
    """The shipped profiles by slug (fresh copies: callers may modify them)."""
    return {s.name: s.model_copy(deep=True) for s in _builtin()}


def get_hardware(name: str) -> HardwareSpec:
    known = load_builtin()
    if name in known:
        return known[name]
    near = difflib.get_close_matches(name.lower(), list(known), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise HardwareError(f"unknown hardware profile {name!r}; {hint}known: {', '.join(sorted(known))}")


# Memory sizes GPUs are sold with, in GB (which vendors use loosely for GiB-ish amounts). NVML
# reports a bit less than the marketed size (ECC, firmware), so totals are rounded up to these.
_MARKETED_GB = (1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141,
                180, 192, 288)
# Variants whose PCIe/NVL versions have other clocks or bandwidth than the SXM part the plain slug
# names, so they must not share its profile.
_VARIANT_FAMILIES = ("h100", "h200")
_VENDOR_WORDS = re.compile(r"\b(nvidia|geforce|tesla|quadro)\b")


def _marketed_gb(total_bytes: int) -> int:
    gib = total_bytes / GiB
    for m in _MARKETED_GB:
        if m >= gib * 0.99:
            # An unlisted size far from the next marketed one is printed as measured.
            return m if m <= gib * 1.15 else round(gib)
    return round(gib)


def slug_for(nvml_name: str, total_bytes: int) -> str:
    """Profile slug for a GPU as NVML reports it: "NVIDIA GeForce RTX 4070", 12282 MiB ->
    "rtx4070-12gb". Memory comes from the name when it says it ("A100-SXM4-80GB"), else from the
    total rounded up to the marketed size (a T4's 15360 MiB is sold as 16 GB)."""
    name = _VENDOR_WORDS.sub(" ", nvml_name.lower())
    in_name = re.search(r"(\d+)\s*gb\b", name)
    gb = int(in_name.group(1)) if in_name else _marketed_gb(total_bytes)
    m = re.search(r"\b(rtx|gtx)\s*(a?\d{3,4})\s*(ti)?\s*(super)?\b", name)
    if m:
        model = "".join(g for g in m.groups() if g)
    else:
        m = re.search(r"\b([a-z]{1,2}\d{1,3}[a-z]?)\b", name)
        if m:
            model = m.group(1)
            if model in _VARIANT_FAMILIES:
                model += "".join(v for v in ("pcie", "nvl") if v in name)
        else:
            model = re.sub(r"[^a-z0-9]+", "", name) or "gpu"
    return f"{model}-{gb}gb"


def match_hardware(info: DeviceInfo) -> HardwareSpec | None:
    """The built-in profile for this device, or None when there is none (never a near guess)."""
    known = load_builtin()
    if info.source.startswith("profile:"):
        return known.get(info.source.removeprefix("profile:"))
    if info.kind == "cpu":
        return None
    spec = known.get(slug_for(info.name, info.total_bytes))
    if spec is not None:
        return spec
    for spec in known.values():  # names NVML reports that the slug rules do not parse
        if info.name in spec.nvml_names and abs(spec.memory_bytes - info.total_bytes) <= 0.05 * spec.memory_bytes:
            return spec
    return None


def cpu_slug(budget_bytes: int) -> str:
    """Profile slug for the budgeted CPU device: "cpu-2gb" for 2 GiB, "cpu-512mb" otherwise."""
    if budget_bytes <= 0:
        raise HardwareError(f"CPU budget must be positive, got {budget_bytes} bytes")
    if budget_bytes % GiB == 0:
        return f"cpu-{budget_bytes // GiB}gb"
    return f"cpu-{max(1, round(budget_bytes / MiB))}mb"
