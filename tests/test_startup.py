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
                          "--set", "vocab_size=64", "--set", "batch_size=2", "--set", "gradient_accumulation_steps=1",
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
