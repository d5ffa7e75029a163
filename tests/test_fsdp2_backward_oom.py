"""FSDP2 on 2 ranks (gloo, CPU): an out-of-memory error on rank 1 alone inside the backward, or in
FSDP2's allocation of a communication buffer, is agreed before rank 0 enters a collective that rank
1 will never join. Both ranks shrink the micro-batch, redo the step and match the unfaulted run.
Before the backward's check-ins (session 10, h3 finding 1), rank 0 waited in FSDP2's backward
all-gather or reduce-scatter and rank 1 in the agreement, until the collective timeout.

Each run is tests/ranks/forward_oom_worker.py under torchrun, a subprocess with a timeout, and
AUTOFIT_DIST_TIMEOUT is set well below it: a hang fails the test (non-zero exit) instead of
blocking it. Also: a rank that gives up after another rank's OOM says a consequence, which the
launcher leaves out (CONSEQUENCES)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "ranks" / "forward_oom_worker.py"
ROOT = Path(__file__).parents[1]
LAUNCH_TIMEOUT = 240  # seconds, for a loaded 2-core machine; the collectives give up after 60


def run_worker(tmp: Path, fault: str) -> list[dict]:
    """Both ranks' records (micro-batch, events, losses) of the worker's 6-step FSDP2 run."""
    out = tmp / fault.replace("/", "_")
    out.mkdir()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOFIT_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                  "MASTER_"))}
    e.update(OMP_NUM_THREADS="1", AUTOFIT_HOME=str(tmp / "home"), AUTOFIT_DIST_TIMEOUT="60", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "fsdp2", fault, str(out), "train"]
    done = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> list[dict]:
    return run_worker(tmp_path_factory.mktemp("clean"), "none")


def assert_shrunk_and_redone(faulted: list[dict], clean: list[dict]) -> None:
    assert [r["micro_batch"] for r in clean] == [2, 2]
    assert [r["events"] for r in faulted] == [[["oom_shrink", 3]]] * 2  # both ranks, at the faulted step
    assert [r["micro_batch"] for r in faulted] == [1, 1]
    for got, want in zip(faulted, clean):
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)


@pytest.mark.parametrize("site", ["head_backward", "block_backward", "embedding_backward"])
def test_an_oom_in_rank_1s_backward_meets_a_check_in_and_both_ranks_redo_the_step(tmp_path, clean, site):
    """The explicit check-ins alone (as on a torch without custom FSDP2 comms): the loss head's
    backward meets the one before the last block's all-gather, a block's backward the one before
    its reduce-scatter, the embeddings' the one before the root's reduce-scatter."""
    assert_shrunk_and_redone(run_worker(tmp_path, f"{site}/explicit"), clean)


@pytest.mark.parametrize("site", ["head_backward", "gather_buffer"])
def test_with_the_buffer_check_ins_too_an_oom_in_the_backward_or_a_gather_buffer_is_redone(tmp_path, clean, site):
    """All check-ins, as on this torch; 'gather_buffer': rank 1 cannot allocate an all-gather's
    buffer, so it never joins that all-gather; rank 0 learns it in the round after its own
    allocation."""
    assert_shrunk_and_redone(run_worker(tmp_path, site), clean)


def test_the_give_up_line_of_a_rank_told_of_another_ranks_oom_is_left_out_by_the_launcher():
    """Session 10 (h3 finding 6): one OOM printed two error lines; rank 0's only repeats rank 1's."""
    from autofit.launch.launcher import failed_lines

    class Failure:  # torchrun's ProcessFailure, as far as failed_lines reads it
        def __init__(self, msg: str):
            self.exitcode, self.message, self.error_file_data = 2, msg, {"message": msg, "autofit": True}

    give_up = "rank {}: out of memory at step 0 with micro-batch 1, and no smaller micro-batch is left to try ({})"
    told = give_up.format(0, "rank 1 ran out of memory in this step")
    own = give_up.format(1, "budgeted CPU device out of memory: tried to allocate 16.0 KiB; 599.9 KiB of 600.0 KiB "
                            "budget in use")
    assert failed_lines({0: Failure(told), 1: Failure(own)}, 2) == ([f"autofit: error: {own}"], 2)
