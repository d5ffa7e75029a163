"""`python -m autofit`, the form torchrun starts: `torchrun --nproc_per_node N -m autofit run ...`."""
import sys

from autofit.cli import main


def run() -> None:
    """main(), then the exit: each of several ranks ends without the interpreter's teardown,
    which a gloo worker thread can abort (trainer.distributed.exit_rank says why)."""
    from trainer.distributed import exit_rank
    try:
        main()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): Python prints it and exits 1
            print(e.code, file=sys.stderr)
            code = 1
    exit_rank(code)


if __name__ == "__main__":
    run()
