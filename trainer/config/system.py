"""The config's system keys, as nanoGPT's train.py names them, checked when a config is built:
`device` ('auto', 'cpu', 'cuda', 'cuda:N') and `backend`, torch.distributed's name for how ranks
talk. autofit chooses the backend itself (NCCL on CUDA, gloo on the CPU: trainer/distributed/
ranks.py) and so ignores the key, but only after it is one torch would take: `--set backend=foo`
passed in silence (t11's L6), where nanoGPT's init_process_group would have refused it.
Imports nothing of torch: a config loads without it."""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from trainer.config.messages import did_you_mean

# torch.distributed.Backend's backends (torch 2.13's backend_list, less 'undefined' and the test
# double 'fake'), written out so that a config loads without torch; nanoGPT's configs use nccl and
# gloo. torch also takes one per device type, 'cpu:gloo,cuda:nccl', and any case (Backend lowers it).
BACKENDS = ("nccl", "gloo", "mpi", "ucc", "xccl")


def _backend(value: str) -> str:
    names = [part.rpartition(":")[2].strip().lower() for part in value.split(",")]
    bad = next((n for n in names if n not in BACKENDS), None)
    if bad is not None:
        raise ValueError(f"not a torch.distributed backend{did_you_mean(bad, BACKENDS)}: give one of "
                         f"{', '.join(BACKENDS)} (or one per device, 'cpu:gloo,cuda:nccl'); autofit uses NCCL on "
                         f"CUDA and gloo on the CPU whatever it names")
    return value


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {value!r}")
    return value


BackendField = Annotated[str, AfterValidator(_backend)]
DeviceField = Annotated[str, AfterValidator(_device)]
