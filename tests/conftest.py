import os

import pytest
import torch

# The commands the tests start as processes (python -m autofit ...) get one OpenMP wait policy,
# whatever the machine's load when they start (autofit.devices.host_load.choose_openmp_wait would
# choose by it, and say so in their output): sleeping waits, the faster under a loaded CI. Set
# after torch loaded here, so this process keeps its own default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_stop_signal_yet():
    """Each test starts with no stop signal noted: the exit code of a stop is 128 + the first one
    this process received (trainer.interrupt.exit_code), and a signal an earlier test sent itself
    would otherwise decide a later test's code."""
    from trainer.interrupt import forget_received
    forget_received()
    yield
