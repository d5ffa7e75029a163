"""Hardware profiles: what a GPU model can hold and do, from vendor figures.

A profile is named by a slug, model + marketed memory ("rtx4070-12gb"), and lives in a TOML file
(the top-level profiles/<slug>.toml for the built-in ones, packaged as autofit/builtin_profiles;
users add their own with `autofit profiles add`). It gives the capacity, compute
capability, bf16 support, peak dense tensor throughput (for honest MFU, per card) and memory
bandwidth. The simulated device uses a profile in place of a GPU that is not present.
"""
from __future__ import annotations

import difflib
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autofit.devices.info import DeviceError, DeviceInfo
from autofit.profiles.files import first_problem, newer_schema
from autofit.units import GiB, MiB


SCHEMA_VERSION = 1
# A share of the card's memory assumed reserved by the driver when its profile has no measured
# figure: NVML v2 reports a few hundred MiB on 12-80 GB cards; 3% errs on the safe side for a budget.
ASSUMED_DRIVER_RESERVED_SHARE = 0.03


# Bounds of a profile's figures, far past any card (B200: 2,250 dense bf16 TFLOP/s, 8,000 GB/s)
MAX_TFLOPS = 100_000.0
MAX_BANDWIDTH_GBS = 1_000_000.0
# ... and short of any (a GT 1030's fp16 runs at 1/64 of its fp32: ~0.02 TFLOP/s; 14 GB/s the
# slowest CUDA card's memory): 1e-300 TFLOP/s made every estimate '0 tokens/s'
MIN_TFLOPS = 0.01
MIN_BANDWIDTH_GBS = 1.0
MIN_COMPUTE_CAPABILITY = (3, 0)  # Kepler, the oldest architecture any CUDA build of torch ran on
# The newest today is 12.x (Blackwell, 2025); majors up to 15 leave room for cards this table has not
# met (their estimates need only the figures given), while 99.99 was taken and answered as if real.
# Every capability so far has a one-digit minor.
MAX_COMPUTE_CAPABILITY_MAJOR = 15


def compute_capability_problem(cc: tuple[int, int] | list[int]) -> str | None:
    """Why (major, minor) is no CUDA card's compute capability, in words; None if it could be one."""
    major, minor = cc
    text = f"{major}.{minor}"
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        return f"compute capability {text} is older than any CUDA card torch ran on (3.0, Kepler)"
    if major > MAX_COMPUTE_CAPABILITY_MAJOR or minor > 9:
        return (f"compute capability {text} is no CUDA card's: the major is 3 to 12 today (up to "
                f"{MAX_COMPUTE_CAPABILITY_MAJOR} taken, for newer cards) and the minor one digit, e.g. 7.5 or 8.9")
    return None


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
    # at most MAX_TFLOPS / MAX_BANDWIDTH_GBS: 1e308 made estimated tokens/s infinite (a traceback)
    peak_bf16_tflops: float | None = Field(default=None, ge=MIN_TFLOPS, le=MAX_TFLOPS, allow_inf_nan=False)
    peak_fp16_tflops: float = Field(ge=MIN_TFLOPS, le=MAX_TFLOPS, allow_inf_nan=False)
    # The dense fp16 tensor TFLOP/s the card holds under its power limit, measured, where that is
    # well below the datasheet's peak (taken at a boost clock the card cannot keep: the 70 W T4).
    # None: the peak holds. The estimated throughput scales every rate by its share of the fp16 peak
    # (autofit.planning.throughput.peak_tflops); MFU is still reported against the datasheet peak.
    sustained_tflops: float | None = Field(default=None, ge=MIN_TFLOPS, le=MAX_TFLOPS, allow_inf_nan=False)
    memory_bandwidth_gbs: float = Field(ge=MIN_BANDWIDTH_GBS, le=MAX_BANDWIDTH_GBS, allow_inf_nan=False)  # GB/s, decimal, as vendors state it
    # Memory the driver and firmware keep on an idle card (NVML v2 memory info's `reserved`): what
    # an emulated card cannot give the process. None until measured on such a card (the GPU
    # self-check records it); emulation then assumes ASSUMED_DRIVER_RESERVED_SHARE, and says so.
    driver_reserved_bytes: int | None = Field(default=None, ge=0)
    source: str  # where the figures come from

    @field_validator("gpu", "source")
    @classmethod
    def _one_line(cls, v: str) -> str:  # printed in lists and tables: a newline broke profiles list's rows
        if any(unicodedata.category(c) == "Cc" for c in v):
            raise ValueError(f"must be one line of text without control characters, got {v[:40]!r}")
        if not v.strip():  # a blank GPU column in profiles list, a blank 'source:' in show
            raise ValueError(f"must not be empty or blank, got {v!r}")
        return v

    @field_validator("nvml_names")
    @classmethod
    def _names_one_line(cls, v: list[str]) -> list[str]:
        for name in v:
            cls._one_line(name)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> HardwareSpec:
        if self.bf16 and self.peak_bf16_tflops is None:
            raise ValueError("bf16 = true needs peak_bf16_tflops")
        if (problem := compute_capability_problem(self.compute_capability)) is not None:
            raise ValueError(problem)
        if self.bf16 and tuple(self.compute_capability) < (8, 0):
            raise ValueError("bf16 tensor cores need compute capability 8.0 or newer")
        if not self.bf16 and tuple(self.compute_capability) >= (8, 0):  # every Ampere and later card has them
            raise ValueError("compute capability 8.0 or newer has bf16 tensor cores: bf16 = true, with "
                             "peak_bf16_tflops (the spec sheet's dense bf16 figure)")
        return self


def load_hardware_file(path: str | Path) -> HardwareSpec:
    """Read and validate one profile TOML; every failure is a HardwareError naming the file."""
    from trainer.paths import PathProblem, TomlProblem, parse_toml, read_user_text
    path = Path(path)
    try:
        data: dict[str, Any] = parse_toml(read_user_text(path, "hardware profile"))
    except PathProblem as e:
        raise HardwareError(str(e)) from None
    except TomlProblem as e:
        raise HardwareError(f"{path}: not valid TOML ({e})") from None
    version = newer_schema(data, SCHEMA_VERSION)
    if version is not None:
        raise HardwareError(f"{path}: schema_version {version} is newer than this autofit reads "
                            f"({SCHEMA_VERSION}); upgrade autofit")
    try:
        spec = HardwareSpec.model_validate(data)
    except ValidationError as e:
        raise HardwareError(f"{path}: invalid hardware profile: {first_problem(e, 'profile')}") from None
    if path.suffix == ".toml" and path.stem != spec.name:
        raise HardwareError(f"{path}: file name must match the profile name {spec.name!r}")
    return spec


def builtin_profiles_dir() -> Path:
    """The folder of built-in hardware profiles: the copy inside an installed wheel
    (autofit/builtin_profiles), else the source checkout's top-level profiles/ (an editable
    install reads that folder itself). Raises HardwareError if neither exists."""
    package = Path(__file__).resolve().parents[1]  # autofit/, above devices/
    for folder in (package / "builtin_profiles", package.parent / "profiles"):
        if folder.is_dir():
            return folder
    raise HardwareError(f"no built-in hardware profiles found (looked in {package / 'builtin_profiles'} "
                        f"and {package.parent / 'profiles'}); reinstall autofit")


@lru_cache(maxsize=1)
def _builtin() -> tuple[HardwareSpec, ...]:
    return tuple(load_hardware_file(p) for p in sorted(builtin_profiles_dir().glob("*.toml")))


def load_builtin() -> dict[str, HardwareSpec]:
    """The shipped profiles by slug (fresh copies: callers may modify them)."""
    return {s.name: s.model_copy(deep=True) for s in _builtin()}


def spec_from_profile(name: str, hardware: dict[str, Any] | None, where: str) -> HardwareSpec:
    """The HardwareSpec in a saved profile's hardware table. Keys that are not HardwareSpec
    fields (such as `kind`, written by a probe) are ignored; the profile's name is the spec's.
    Raises HardwareError naming `where` when the description is missing or incomplete."""
    add = (f"autofit profiles add {name} --memory 4GiB --compute-capability 7.5 "
           "--peak-fp16-tflops 8.9 --bandwidth-gbs 192")
    if not hardware or hardware.get("kind") == "cpu":
        raise HardwareError(f"{where}: profile {name} describes no GPU (a budgeted-CPU profile?); "
                            f"describe one with: {add}")
    fields = {k: v for k, v in hardware.items() if k in HardwareSpec.model_fields}
    fields.setdefault("nvml_names", [fields["gpu"]] if isinstance(fields.get("gpu"), str) else [])
    try:
        return HardwareSpec.model_validate({**fields, "name": name})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "hardware"
        raise HardwareError(f"{where}: profile {name} has no complete GPU description ({key}: {err['msg']}); "
                            f"write one with: {add}") from None


def user_hardware(name: str) -> HardwareSpec | None:
    """The GPU described in the user's profile file `name` ($AUTOFIT_HOME/profiles), or None if
    there is no such file. Raises ProfileError for an unreadable file, HardwareError for one
    that describes no complete GPU."""
    from autofit.profiles.store import load_profile, profile_path  # profiles imports nothing of ours
    saved = load_profile(name)
    if saved is None:
        return None
    return spec_from_profile(name, saved.hardware, str(profile_path(name)))


def known_hardware() -> dict[str, HardwareSpec]:
    """Built-in profiles overlaid with every user profile that describes a complete GPU (a user
    file with a built-in's name wins). Unreadable or incomplete user files are skipped here;
    get_hardware reports them when one is asked for by name."""
    from autofit.profiles.manage import ProfileError, list_profiles
    known = load_builtin()
    for entry in list_profiles():
        try:
            spec = user_hardware(entry.name)
        except (ProfileError, HardwareError):
            continue
        if spec is not None:
            known[spec.name] = spec
    return known


def get_hardware(name: str) -> HardwareSpec:
    """The hardware profile `name`: the user's (`autofit profiles add`, or a saved profile with a
    complete description) if there is one, else the built-in. Raises HardwareError for an unknown
    name (with near matches) or a user file that names no complete GPU and shadows no built-in;
    ProfileError for an unreadable user file."""
    from autofit.profiles.store import NAME_RE
    builtin = load_builtin()
    try:
        # A name no profile file can have ("RTX4070") is not looked up; near matches follow.
        spec = user_hardware(name) if NAME_RE.fullmatch(name) else None
    except HardwareError:
        if name in builtin:  # e.g. a probe's CPU-less save under a built-in's name: the built-in holds
            return builtin[name]
        raise
    if spec is not None:
        return spec
    if name in builtin:
        return builtin[name]
    known = known_hardware()
    # the card typed without its memory ('4070', 'a100') is found in the names; else the close ones,
    # at a cutoff that 'nosuch-4gb' does not reach (0.5 took 'h200-141gb' for it: '-' and 'gb' alone)
    card = name.lower().split("-")[0]
    near = [k for k in known if card and card in k][:3] or difflib.get_close_matches(name.lower(), list(known), n=3,
                                                                                     cutoff=0.6)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise HardwareError(f"unknown hardware profile {name!r}; {hint}known: {', '.join(sorted(known))} "
                        f"(add your own with autofit profiles add)")


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
    """The hardware profile (user or built-in) for this device, or None when there is none
    (never a near guess)."""
    known = known_hardware()
    if info.source.startswith("profile:"):
        return known.get(info.source.removeprefix("profile:"))
    if info.kind == "cpu":
        return None
    return spec_named(info.name, info.total_bytes, known)


def spec_named(name: str, total_bytes: int, known: dict[str, HardwareSpec]) -> HardwareSpec | None:
    """The profile among `known` (slug -> spec) of a card NVML names `name` with `total_bytes`: by
    its slug, else one listing `name` among its NVML names whose memory is within 5 % (names the slug
    rules do not parse); None otherwise (never a near guess)."""
    spec = known.get(slug_for(name, total_bytes))
    if spec is not None:
        return spec
    return next((s for s in known.values()
                 if name in s.nvml_names and abs(s.memory_bytes - total_bytes) <= 0.05 * s.memory_bytes), None)


def cpu_slug(budget_bytes: int) -> str:
    """Profile slug for the budgeted CPU device: "cpu-2gb" for 2 GiB, "cpu-512mb" otherwise."""
    if budget_bytes <= 0:
        raise HardwareError(f"CPU budget must be positive, got {budget_bytes} bytes")
    if budget_bytes % GiB == 0:
        return f"cpu-{budget_bytes // GiB}gb"
    return f"cpu-{max(1, round(budget_bytes / MiB))}mb"


def builtin_hardware(name: str) -> dict | None:
    """The built-in hardware profile `name` as JSON-ready data (what a saved profile's file holds
    beside its plans), or None when there is no such built-in profile."""
    hw = load_builtin().get(name)
    return hw.model_dump(mode="json") if hw is not None else None
