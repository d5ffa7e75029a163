"""Running the `autofit` command in-process, for the tests: argv set, SystemExit caught, the
output captured. Imported by test files (pytest puts this folder on sys.path)."""
from __future__ import annotations

import sys

from autofit.cli.app import main


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `autofit ARGS`."""
    monkeypatch.setattr(sys, "argv", ["autofit", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err
