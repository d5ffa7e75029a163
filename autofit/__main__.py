"""`python -m autofit`, the form torchrun starts: `torchrun --nproc_per_node N -m autofit run ...`,
and the `autofit` command's entry point."""
import sys


def run() -> None:
    """main(), then the exit: each of several ranks ends without the interpreter's teardown,
    which a gloo worker thread can abort (trainer.distributed.ranks.exit_rank says why). Commands
    that need no torch (--help, profiles, config) never import it: it is most of the start-up. A Ctrl-C,
    SIGTERM or SIGHUP while torch and the CLI load (a second or two) is one line too, and the exit
    code the same signal gives later in the command (autofit.interrupts.exit_code)."""
    try:
        # inside the try, with the CLI: a Ctrl-C in this first import (typing's, the first
        # milliseconds, longer on a loaded machine) was uncaught, and Python ended by SIGINT (-2)
        from autofit import interrupts  # no torch: loads at once
        interrupts.unwind_stops()  # SIGTERM/SIGHUP from here on: that line too, not a silent death
        from autofit.devices.host_load import choose_openmp_wait
        choose_openmp_wait()  # before torch loads: libgomp reads its wait policy once, then
        from autofit.cli import app as cli  # no torch: the commands import it when they need it
    except KeyboardInterrupt:
        _interrupted_while_starting()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): Python prints it and exits 1
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        # one that reached past main()'s own handling (a Ctrl-C within its exit path, e.g. while it
        # said its line): uncaught, Python ends by SIGINT, exit status -2, not the 130 promised
        cli.say_interrupted()
        code = interrupts.exit_code()
    _forget_caught_interrupt()
    # --help, profiles, config, or a Ctrl-C while torch or the group's module loaded: no process
    # group can exist (and importing a half-built torch again would fail with tracebacks)
    if "trainer.distributed.ranks" not in sys.modules:
        sys.exit(code)
    from trainer.distributed.ranks import exit_rank
    exit_rank(code)


def _interrupted_while_starting() -> None:
    """The line and exit for a stop that came while the CLI loaded. Raises SystemExit."""
    from autofit import interrupts  # loads now if the stop fell into its own import
    from autofit.devices.ranks import other_rank  # no torch
    if not other_rank():  # under torchrun rank 0 says it, once
        print("autofit: interrupted while starting; nothing was done", file=sys.stderr)
    _forget_caught_interrupt()
    sys.exit(interrupts.exit_code())


def _forget_caught_interrupt() -> None:
    """Before the exit: CPython (3.8 to 3.13 at least) marks a KeyboardInterrupt that escaped code
    run by exec() of a string as unhandled, even once it was caught, and `python -m` (torchrun's
    form) then ends the process by SIGINT, whatever code sys.exit gave: a SIGTERM that landed in a
    dataclass's methods being built while torch loaded exited 130 (-2 to a parent), not 143. exec()
    of a string clears that mark as it starts; this one runs nothing."""
    exec("")


if __name__ == "__main__":
    run()
