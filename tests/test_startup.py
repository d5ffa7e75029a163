"""Commands that need no torch do not import it: it is most of autofit's start-up time."""
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
sys.argv = ["autofit"] + sys.argv[1:]
from autofit.__main__ import run
try:
    run()
except SystemExit as e:
    code = e.code
print("TORCH-LOADED" if "torch" in sys.modules else "TORCH-ABSENT", code, file=sys.stderr)
print("NUMPY-LOADED" if "numpy" in sys.modules else "NUMPY-ABSENT", file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["probe", "--help"], ["profiles", "list"],
                                  ["profiles", "show", "rtx4070-12gb"], ["config", "--preset", "tiny"]])
def test_commands_that_need_no_torch_do_not_import_it(args, tmp_path):
    env = {"AUTOFIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    assert "TORCH-ABSENT 0" in out.stderr, out.stderr[-2000:]
    if "--help" in args or args[0] == "profiles":  # main()'s early numpy (for torch's start-up) is not theirs
        assert "NUMPY-ABSENT" in out.stderr, out.stderr[-2000:]


def test_a_command_that_trains_still_exits_through_exit_rank(tmp_path):
    """The check is real: a command that builds a model does load torch (and then leaves through
    trainer.distributed.ranks.exit_rank, as several ranks must)."""
    env = {"AUTOFIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PROBE, "probe", "--device", "cpu", "--budget", "64MiB", "--set",
                          "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=16",
                          "--set", "vocab_size=256", "--set", "batch_size=2", "--set", "gradient_accumulation_steps=1",
                          "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert "TORCH-LOADED 0" in out.stderr, out.stderr[-2000:]


CTRL_C_IN_NUMPY = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C finds it


class CtrlCInNumpy:  # a real SIGINT, sent while numpy's own __init__ imports its first submodule
    def find_spec(self, name, path=None, target=None):
        if name.startswith("numpy.") and "numpy" in sys.modules and not getattr(self, "sent", False):
            self.sent = True
            print("SIGINT-SENT", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlCInNumpy())
sys.argv = ["autofit"] + sys.argv[1:]
from autofit.__main__ import run
run()
"""


def test_ctrl_c_while_numpy_loads_is_heard(tmp_path):
    """torch's C start-up imports numpy and discards any exception raised in it (numpy is optional
    there): a Ctrl-C that fell into the numpy import done by the first `import torch` was dropped,
    numpy was left half-built, and the run trained to the end (exit 0) or broke later with a
    traceback. main() imports numpy first, where a Ctrl-C is the usual one line and 130."""
    # this checkout's autofit (cwd is tmp_path, so that nothing is written in the checkout)
    env = {"AUTOFIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", CTRL_C_IN_NUMPY, "run", "--device", "cpu", "--no-probe",
                          "--no-progress", "--max-steps", "1", "--out", str(tmp_path / "o"), "--set", "n_layer=1",
                          "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=16",
                          "--set", "batch_size=2", "--set", "gradient_accumulation_steps=1"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.stderr.splitlines() == ["SIGINT-SENT", "autofit: interrupted; nothing was saved"], out.stderr[-3000:]
    assert out.returncode == 130 and not (tmp_path / "o" / "ckpt.pt").exists()


SIGNAL_AT_IMPORT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C finds it
for name in ("SIGTERM", "SIGHUP"):  # their default, whatever the test runner inherited
    signal.signal(getattr(signal, name), signal.SIG_DFL)
SIG, AT = getattr(signal, os.environ["TEST_SIGNAL"]), os.environ["TEST_AT_IMPORT"]


class SignalAtImport:  # a real signal, sent when the module AT is first looked for
    def find_spec(self, name, path=None, target=None):
        if name == AT and not getattr(self, "sent", False):
            self.sent = True
            print("SIGNAL-SENT", file=sys.stderr, flush=True)
            os.kill(os.getpid(), SIG)
        return None


sys.meta_path.insert(0, SignalAtImport())
sys.argv = ["autofit"] + sys.argv[1:]
from autofit.__main__ import run
run()
"""
LAUNCHER = ["--nproc-per-node", "2"]


def _signalled_at_import(tmp_path, sig: str, module: str, *args: str):
    env = {"AUTOFIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TEST_SIGNAL": sig, "TEST_AT_IMPORT": module}
    return subprocess.run([sys.executable, "-c", SIGNAL_AT_IMPORT, "run", "--device", "cpu", "--budget", "64MiB",
                           "--max-steps", "1", "--out", str(tmp_path / "o"), "--set", "n_layer=1", "--set", "n_embd=32",
                           "--set", "n_head=2", "--set", "block_size=16", "--set", "batch_size=2",
                           "--set", "gradient_accumulation_steps=1", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_a_ctrl_c_in_the_first_import_is_one_line_and_130(tmp_path):
    """t2 (session 11) saw one early Ctrl-C in ~20 end by SIGINT (exit -2): the entry point's first
    import (autofit.interrupts, with typing's, the first milliseconds, longer on a loaded machine)
    was outside its try, so the KeyboardInterrupt was uncaught and Python ended by the signal.
    Found by sending SIGINT at every import of a launcher's start; this was the one window."""
    out = _signalled_at_import(tmp_path, "SIGINT", "autofit.interrupts", *LAUNCHER)
    assert out.stderr.splitlines() == ["SIGNAL-SENT", "autofit: interrupted while starting; nothing was done"], \
        out.stderr[-3000:]
    assert out.returncode == 130


@pytest.mark.parametrize("sig, module, args, code, line", [
    # before any handler of autofit's: SIGTERM and SIGHUP ended the process silently, by the signal
    ("SIGHUP", "autofit.cli", LAUNCHER, 129, "interrupted while starting; nothing was done"),
    ("SIGTERM", "numpy", LAUNCHER, 143, "interrupted; nothing was saved"),
    ("SIGHUP", "numpy", [], 129, "interrupted; nothing was saved"),  # one process: 128 + N too, as training's stop
    ("SIGTERM", "autofit.cli", [], 143, "interrupted while starting; nothing was done"),
    # inside the command, before torchrun runs: the launcher said 130 where torchrun's stop says 129
    ("SIGHUP", "autofit.launch.launcher", LAUNCHER, 129, "interrupted; nothing was saved"),
])
def test_an_early_stop_signal_is_one_line_and_the_code_it_has_later(tmp_path, sig, module, args, code, line):
    """t2 (session 11): SIGHUP to `autofit run --nproc-per-node 2` at 0.5 s ended 130, at 1.5 s and
    later 129 (the launcher returns 128 + the signal once torchrun runs); and earlier still, while
    the CLI loaded, SIGTERM or SIGHUP killed the process without a word. Now the same signal gives
    one line and the same code whenever it comes: 128 + the signal's number, in the launcher and
    in one process alike (130 was once every stop's code in one process)."""
    out = _signalled_at_import(tmp_path, sig, module, *args)
    assert out.stderr.splitlines() == ["SIGNAL-SENT", f"autofit: {line}"], out.stderr[-3000:]
    assert out.returncode == code and not (tmp_path / "o" / "ckpt.pt").exists()


# The stop signal lands inside code that exec() runs from a string, as dataclasses and namedtuple
# build their methods while torch and the CLI load (r8 saw it in torch.profiler's dataclasses); nothing run after it may exec() a string, which clears
# the mark (below), so the signal is sent in torch's import, which then stops
SIGNAL_IN_EXEC = SIGNAL_AT_IMPORT.replace(
    "            os.kill(os.getpid(), SIG)",
    "            exec('import os\\nos.kill(os.getpid(), SIG)\\nfor _ in range(10000): pass', {'SIG': SIG})")


@pytest.mark.parametrize("sig, module, code, line", [
    ("SIGTERM", "torch", 143, "interrupted; nothing was saved"),  # where r8 saw it: in torch's import
    ("SIGHUP", "torch", 129, "interrupted; nothing was saved"),
])
def test_a_stop_signal_inside_exec_keeps_its_code_under_python_m(tmp_path, sig, module, code, line):
    """r8 (session 18): `python -m autofit run` (torchrun's form, and the user's) sent SIGTERM in its
    first second or so exited 130 in about 1 run in 15, by SIGINT (-2 to a parent), though it said
    its line and sys.exit(143): CPython marks a KeyboardInterrupt that escaped code run by exec() of
    a string as unhandled even once caught, and `python -m` then ends by SIGINT whatever the exit
    code. The -c form above does not check that mark, so it passed."""
    (tmp_path / "stop_in_exec.py").write_text(SIGNAL_IN_EXEC)
    env = {"AUTOFIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TEST_SIGNAL": sig, "TEST_AT_IMPORT": module}
    out = subprocess.run([sys.executable, "-m", "stop_in_exec", "run", "--device", "cpu", "--budget", "64MiB",
                          "--max-steps", "1", "--out", str(tmp_path / "o"), "--set", "n_layer=1"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.stderr.splitlines() == ["SIGNAL-SENT", f"autofit: {line}"], out.stderr[-3000:]
    assert out.returncode == code and not (tmp_path / "o").exists()
