"""Commands that need no torch do not import it: it is most of autofit's start-up time."""
import subprocess
import sys

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
"""


@pytest.mark.parametrize("args", [["--help"], ["probe", "--help"], ["profiles", "list"],
                                  ["profiles", "show", "rtx4070-12gb"], ["config", "--preset", "tiny"]])
def test_commands_that_need_no_torch_do_not_import_it(args, tmp_path):
    env = {"AUTOFIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    assert "TORCH-ABSENT 0" in out.stderr, out.stderr[-2000:]


def test_a_command_that_trains_still_exits_through_exit_rank(tmp_path):
    """The check is real: a command that builds a model does load torch (and then leaves through
    trainer.distributed.ranks.exit_rank, as several ranks must)."""
    env = {"AUTOFIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PROBE, "probe", "--device", "cpu", "--budget", "64MiB", "--set",
                          "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=16",
                          "--set", "vocab_size=64", "--set", "batch_size=2", "--set", "gradient_accumulation_steps=1",
                          "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert "TORCH-LOADED 0" in out.stderr, out.stderr[-2000:]
