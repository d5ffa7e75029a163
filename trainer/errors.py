"""Errors of the training run that a user can act on."""


class TrainError(RuntimeError):
    """A failure the user can act on (one line, no traceback): no checkpoint to resume, a
    checkpoint of another model, no smaller micro-batch left after an out-of-memory error."""


def install_hint(extra: str, *packages: str) -> str:
    """How to install what an optional feature needs: the packages themselves, and the extra of
    pyproject.toml from a checkout; never an extra of 'autofit' from the package index: this autofit
    is not published there, and an unrelated package of that name is.

    >>> install_hint("plot", "matplotlib")
    'pip install matplotlib (from an autofit checkout: pip install -e ".[plot]")'
    """
    return f'pip install {" ".join(packages)} (from an autofit checkout: pip install -e ".[{extra}]")'


def counted(n: int, word: str, plural: str | None = None) -> str:
    """n and the word in the number it takes, for the lines a user reads ('1 GPU', '2 GPUs',
    '0 GPUs'); `plural` when it is not word + 's'. The package's one plural helper (autofit
    imports it; trainer never imports autofit).

    >>> counted(1, "round"), counted(3, "alternating round"), counted(0, "GPU UUID")
    ('1 round', '3 alternating rounds', '0 GPU UUIDs')
    """
    return f"{n} {word if n == 1 else plural or word + 's'}"
