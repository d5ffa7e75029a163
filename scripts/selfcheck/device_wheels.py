"""Which wheels the offline GPU machine needs: autofit's dependencies (pyproject.toml, core and
`dev`) that the machine lacks (device_packages.txt), with everything those need in turn, each at
the version installed here (the one the tests ran with). Prints NAME==VERSION lines for
scripts/prepare_device_wheels.sh.

    python scripts/selfcheck/device_wheels.py [--python-version 3.12]

The machine's own compiled stack (torch, numpy, triton, the nvidia-* libraries) is never carried:
its torch is the CUDA build the check is about. A carried package brings its own requirements
even where the machine has them, since the machine's versions are not known here (pydantic 2.14,
for one, needs typing-extensions >= 4.16).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import requirements  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NEVER_CARRY = re.compile(r"^(torch|numpy|triton|nvidia-.*|pip|setuptools|wheel)$")


class WheelListError(RuntimeError):
    """Something the user must fix first (a package not installed here); one line."""


def norm(name: str) -> str:
    """PEP 503 normalised name: 'Typing_Extensions' -> 'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages(path: Path = HERE / "device_packages.txt") -> set[str]:
    return {norm(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def device_env(python_version: str) -> dict[str, str]:
    """Marker environment of the device: CPython on x86-64 Linux."""
    return {"python_version": python_version, "python_full_version": python_version + ".0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
            "extra": ""}


def applies(req, env: dict[str, str]) -> bool:
    return req.marker is None or req.marker.evaluate(env)


def needed(reqs: list[str], on_device: set[str], env: dict[str, str],
           requires=md.requires) -> dict[str, str]:
    """{normalised name: requirement text that brought it} for every package to carry."""
    from packaging.requirements import Requirement
    carry: dict[str, str] = {}
    todo = [Requirement(r) for r in reqs]
    top = True  # pyproject's own requirements: carried only where the device lacks them
    while todo:
        nxt = []
        for req in todo:
            name = norm(req.name)
            if not applies(req, env) or NEVER_CARRY.match(name) or name in carry or (top and name in on_device):
                continue
            carry[name] = str(req)
            try:
                nxt += [Requirement(r) for r in (requires(req.name) or [])]
            except md.PackageNotFoundError:
                raise WheelListError(f"{req.name} ({req}) is not installed here; run scripts/setup_env.sh first") from None
        todo, top = nxt, False
    return carry


def pinned(carry: dict[str, str], version=md.version) -> list[str]:
    out = []
    for name in sorted(carry):
        try:
            out.append(f"{name}=={version(name)}")
        except md.PackageNotFoundError:
            raise WheelListError(f"{name} (needed for {carry[name]!r}) is not installed here; "
                                 f"run scripts/setup_env.sh first") from None
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python-version", default="3.12")
    a = ap.parse_args()
    try:
        carry = needed(requirements(REPO / "pyproject.toml"), device_packages(), device_env(a.python_version))
        print("\n".join(pinned(carry)))
    except WheelListError as e:
        print(f"device_wheels: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
