"""The [hardware] table of a saved profile, typed: what autofit.profiles.store checks on reading."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# More memory than any one device has (1 PiB): a larger figure in a profile is a typo or an edit,
# and would become a budget no machine can give.
MAX_MEMORY_BYTES = 2**50


class StoredHardware(BaseModel):
    """The [hardware] table of a saved profile, as read back: a budgeted CPU's (kind 'cpu', its
    budget as memory_bytes) or a GPU's (autofit.devices.hardware.HardwareSpec's fields, from
    `autofit profiles add` or a probe). Each field typed and in range, so that a hand edit
    (memory_bytes = 10**30, compute_capability = []) is refused when the file is read, naming
    the field; callers keep reading the plain dict (SavedProfile.hardware)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    schema_version: int | None = Field(default=None, ge=1)
    name: str | None = None
    gpu: str | None = None
    kind: Literal["cpu", "cuda"] | None = None
    nvml_names: list[str] | None = None
    memory_bytes: int | None = Field(default=None, ge=1, le=MAX_MEMORY_BYTES)
    compute_capability: list[Annotated[int, Field(ge=0, le=99)]] | None = Field(default=None, min_length=2,
                                                                                 max_length=2)
    bf16: bool | None = None
    peak_bf16_tflops: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    peak_fp16_tflops: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    sustained_tflops: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    memory_bandwidth_gbs: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    driver_reserved_bytes: int | None = Field(default=None, ge=0, le=MAX_MEMORY_BYTES)
    source: str | None = None

    @field_validator("peak_bf16_tflops", "peak_fp16_tflops", "sustained_tflops", "memory_bandwidth_gbs", mode="before")
    @classmethod
    def _int_is_a_float(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v  # TOML writes 192 for 192.0
