"""Stage 0 of the GPU self-check: is everything autofit needs importable here, at a version that
pyproject.toml accepts, and where did each package come from (the machine's own site-packages, or
the wheels carried in .whl/)?  Writes OUT/stage0_env.json.

    python scripts/selfcheck/env_check.py OUT [--dry-run]
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Stage, git_commit, requirements, stage_args  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def check_requirement(text: str, carried_dir: str | None) -> dict:
    """{requirement, name, installed, ok, where} for one requirement string; ok None when its
    marker does not apply to this Python."""
    from packaging.requirements import Requirement
    req = Requirement(text)
    row = {"requirement": text, "name": req.name, "installed": None, "ok": None, "where": None}
    if req.marker is not None and not req.marker.evaluate():
        row["where"] = "not needed on this Python"
        return row
    try:
        dist = md.distribution(req.name)
    except md.PackageNotFoundError:
        row["ok"] = False
        row["where"] = "missing"
        return row
    row["installed"] = dist.version
    row["ok"] = req.specifier.contains(dist.version, prereleases=True)
    site = str(dist.locate_file(""))
    row["where"] = "carried (.whl)" if carried_dir and site.startswith(carried_dir) else site
    return row


def torch_facts() -> dict:
    import torch
    facts = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
             "cuda_available": torch.cuda.is_available()}
    try:
        facts["cudnn"] = torch.backends.cudnn.version()
    except Exception as e:  # noqa: BLE001 - a broken cuDNN install is a finding, not a crash
        facts["cudnn"] = f"error: {e}"
    return facts


def main() -> int:
    a = stage_args(work=False)
    st = Stage(a.out, 0, "env", a.dry_run)
    st.set(python=platform.python_version(), executable=sys.executable, machine=platform.machine(),
           commit=git_commit(REPO), pythonpath=os.environ.get("PYTHONPATH", ""))
    st.set(**torch_facts())
    carried = os.environ.get("SELFCHECK_SITE")
    try:
        import packaging  # noqa: F401 - pip's own dependency, present wherever pip is
    except ImportError:
        st.skip("dependency versions", "the packaging module is missing, so specifiers cannot be read")
        return st.finish()
    rows = [check_requirement(r, carried) for r in requirements(REPO / "pyproject.toml")]
    st.set(requirements=rows)
    for r in rows:
        if r["ok"] is not None:
            st.check(f"{r['requirement']}", r["ok"], f"{r['installed']} ({r['where']})" if r["installed"] else "missing")
    try:  # the CLI imports its modules lazily: import what `autofit run` and `probe` use
        import importlib
        for mod in ("autofit.cli.app", "autofit.launch.run", "autofit.launch.probe", "trainer.loop"):
            importlib.import_module(mod)
        import autofit
        st.check("autofit imports from the working tree", True, str(Path(autofit.__file__).parent))
    except Exception as e:  # noqa: BLE001 - report any import failure in one line
        st.check("autofit imports from the working tree", False, f"{type(e).__name__}: {e}")
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
