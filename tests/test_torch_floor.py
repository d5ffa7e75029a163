"""The declared torch floor (pyproject.toml) is what the code needs: the newest first-release in
docs/torch-floor.md among the APIs autofit/ and trainer/ call, and no call newer than it."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# APIs younger than the floor, each with the release that first shipped it: using one in autofit/
# or trainer/ needs a fallback, or a higher floor in pyproject.toml and docs/torch-floor.md.
NEWER_THAN_FLOOR = {
    r"\btorch\.accelerator\b": "2.6",
    r"\btorch\.compiler\.set_stance\b": "2.6",
    r"from torch\.distributed\.fsdp import[^\n]*\bfully_shard\b": "2.6",
    r"\benable_gqa\s*=": "2.5",
    r"\bflex_attention\b": "2.5",
}


def version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def declared_floor() -> str:
    m = re.search(r'"torch>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert m, "pyproject.toml declares no torch>= floor"
    return m.group(1)


def table_rows() -> list[list[str]]:
    rows = []
    for line in (REPO / "docs" / "torch-floor.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and re.fullmatch(r"\**[0-9.]+\**", cells[1]):
            rows.append(cells)
    return rows


def test_the_floor_is_the_newest_api_the_code_calls():
    used = [r for r in table_rows() if re.search(r"\b(autofit|trainer)/", r[3])]
    assert len(used) >= 10
    newest = max((r[1].strip("*") for r in used), key=version)
    assert newest == declared_floor(), f"docs/torch-floor.md says the code needs torch {newest}"


@pytest.mark.parametrize("pattern,first", sorted(NEWER_THAN_FLOOR.items()))
def test_no_call_newer_than_the_floor(pattern, first):
    assert version(first) > version(declared_floor())
    hits = [f"{p.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
            for p in sorted([*REPO.glob("autofit/**/*.py"), *REPO.glob("trainer/**/*.py")])
            for text in [p.read_text()] for m in re.finditer(pattern, text)]
    assert not hits, (f"{pattern} first shipped in torch {first}, above the declared floor "
                      f"{declared_floor()}: add a fallback or raise the floor ({', '.join(hits)})")
