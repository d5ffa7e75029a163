"""The layout's rules, read from the source (no import is run): each part of autofit and trainer
imports only from parts below it, trainer never imports autofit, no import cycle, and no module
or function grows past what a reader holds in their head (400 and 60 lines)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Parts, lowest first (the packages' __init__ docstrings say the same). A module imports from its own
# part or a lower one; parts of equal rank (launch and report) do not import each other.
PARTS = {
    "autofit": {"units": 0, "interrupts": 0, "records": 0, "profiles": 1, "devices": 2, "planning": 3,
                "launch": 4, "report": 4, "cli": 5, "__main__": 6, "__init__": 0},
    "trainer": {"errors": 0, "paths": 0, "interrupt": 0, "meter": 0, "clock": 0, "schedule": 0, "compiler": 0,
                "__init__": 0, "muon": 0, "step": 1, "writes": 1, "phases": 1, "data": 2, "config": 3, "model": 3,
                "checkpoint": 4, "distributed": 4,
                "options": 5, "recovery": 5, "evaluate": 5, "metrics": 5, "sample": 5, "redo": 6, "loop": 7},
}


def modules():
    """{dotted name: path} of every module of both packages."""
    out = {}
    for pkg in PARTS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__" and len(parts) > 2:
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.count(".") >= 1:
                found.add(name)
    return found


def part(module: str) -> tuple[str, str]:
    pkg, _, rest = module.partition(".")
    return pkg, rest.split(".")[0] or "__init__"


def graph():
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_every_module_belongs_to_a_named_part():
    unplaced = [m for m in modules() if part(m)[1] not in PARTS[part(m)[0]]]
    assert unplaced == [], "add these to PARTS (and to the package docstring): " + ", ".join(unplaced)


def test_no_part_imports_a_higher_or_sibling_part_and_trainer_never_imports_autofit():
    wrong = []
    for src, deps in graph().items():
        (spkg, spart) = part(src)
        for dst in deps:
            (dpkg, dpart) = part(dst)
            if spkg == "trainer" and dpkg == "autofit":
                wrong.append(f"{src} -> {dst} (trainer imports autofit)")
            elif spkg == dpkg and dpart != spart and PARTS[dpkg][dpart] >= PARTS[spkg][spart]:
                wrong.append(f"{src} -> {dst}")
    assert wrong == [], "imports that run upward or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    deps = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(deps.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "\n".join(cycles)


def test_no_module_over_400_lines_and_no_function_over_60():
    long_modules, long_functions = [], []
    for m, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(m)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{m}.{node.name}")
    assert long_modules == [] and long_functions == []


def test_the_rule_test_sees_an_upward_import(tmp_path):
    # A wrong checker (one that finds no imports at all) would pass the tests above; this one would fail.
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    from autofit.cli.app import app\n")
    known = set(modules())
    assert imports(probe, known) == {"autofit.cli.app"}
