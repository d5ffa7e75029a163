"""`autofit run --nproc-per-node N`: the environment it gives the ranks, and how the ranks' error
lines reach the user (once, on stderr), pinned without torchrun; one launch checks the whole path."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from autofit.launch import launcher, torchrun
from autofit.launch.launcher import failed_lines, rank_environment
from autofit.launch.torchrun import report_error


def test_omp_threads_are_shared_out_when_the_user_set_none():
    extra, line = rank_environment({}, 4, 16)
    assert extra == {"OMP_NUM_THREADS": "4"} and "OMP_NUM_THREADS=4 for each of the 4 ranks" in line
    assert rank_environment({}, 3, 2)[0] == {"OMP_NUM_THREADS": "1"}  # never 0
    assert rank_environment({"OMP_NUM_THREADS": "6"}, 4, 16) == ({}, None)  # the user's own is kept
    assert rank_environment({}, 1, 16) == ({}, None)  # one rank: torchrun sets nothing either


def test_relaunch_gives_the_ranks_the_share_and_keeps_torchruns_banner_away(monkeypatch):
    import torch.distributed.run as tdr
    seen = {}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launcher, "cpu_cores", lambda: 8)
    monkeypatch.setattr(tdr, "run", lambda args: seen.update(omp=os.environ.get("OMP_NUM_THREADS"),
                                                             launched=os.environ.get(torchrun.LAUNCHED_ENV)))
    logged = []
    monkeypatch.setattr(os, "environ", dict(os.environ))  # relaunch writes the ranks' environment here
    assert launcher.relaunch(["run", "--nproc-per-node", "2"], 2, logged.append) == 0
    assert seen == {"omp": "4", "launched": str(os.getpid())} and len(logged) == 1  # set before torchrun reads it: no banner


def test_a_killed_launchers_folder_is_removed_by_the_next_launch(monkeypatch, tmp_path):
    """A launcher killed with SIGKILL left its empty autofit-launch-* folder in /tmp (session 11);
    the next launch removes those whose launcher is gone, and keeps a live one's and others'."""
    import tempfile

    import torch.distributed.run as tdr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process has now (reused only after the kernel wraps around)
    gone = tmp_path / f"{launcher.NOTES_PREFIX}{dead.pid}-abc123"
    live = tmp_path / f"{launcher.NOTES_PREFIX}{os.getppid()}-def456"
    other = tmp_path / f"{launcher.NOTES_PREFIX}notapid"
    for d in (gone, live, other):
        d.mkdir()
    (gone / "said").write_text("")
    made = []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(tdr, "run", lambda args: made.extend([*(p.name for p in tmp_path.iterdir()), args.log_dir]))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert launcher.relaunch(["run"], 2) == 0
    assert not gone.exists() and live.is_dir() and other.is_dir()
    ours = [n for n in made[:-1] if n.startswith(f"{launcher.NOTES_PREFIX}{os.getpid()}-")]
    assert len(ours) == 1 and not (tmp_path / ours[0]).exists()  # its own, removed when it ends
    # torchrun's log folder (the ranks' error files) is inside it: a torchelastic_* folder was left
    # in /tmp by every launch (678 of them on this machine, session 12)
    assert made[-1] == str(tmp_path / ours[0] / "torchrun")


@dataclass
class Failure:  # what torchrun's ProcessFailure carries
    exitcode: int
    message: str = ""
    error_file_data: dict = field(default_factory=dict)

    def signal_name(self):
        return signal.Signals(-self.exitcode).name


def said(msg):
    return Failure(2, msg, {"message": msg, "autofit": True})


def test_the_same_error_on_every_rank_is_said_once_unprefixed():
    assert failed_lines({0: said("bad config"), 1: said("bad config")}, 2) == (["autofit: error: bad config"], 2)
    stopped_after_saying = Failure(-signal.SIGTERM, "bad config", {"message": "bad config", "autofit": True})
    assert failed_lines({0: stopped_after_saying, 1: said("bad config")}, 2)[1] == 2
    assert failed_lines({0: stopped_after_saying}, 1)[1] == 2  # a user error, not 128 + SIGTERM


def test_an_error_of_some_ranks_names_them_and_torchruns_sigterm_is_not_news():
    lines, code = failed_lines({0: Failure(-signal.SIGTERM), 1: said("no GPU of its own")}, 2)
    assert lines == ["autofit: error: rank 1: no GPU of its own"] and code == 2
    # torchrun's SIGTERM taken as a stop (exit code 143) by a rank still in its session; 130 (a
    # Ctrl-C of its own) is no news beside the error either
    for code in (143, 130):
        assert failed_lines({0: said("bad config"), 1: Failure(code)}, 2) == (["autofit: error: rank 0: bad config"], 2)
    # nobody said why: interrupted, and the launcher cannot say a checkpoint was saved
    assert failed_lines({0: Failure(130)}, 1) == (["autofit: interrupted: rank 0 stopped with exit code 130; no "
                                                   "rank said it saved a checkpoint"], 130)
    # issue 19: the cause once; rank 0's 'lost contact' is only its consequence
    lost = "rank 0: lost contact with another rank (Connection closed by peer); stopping here, the last checkpoint is kept"
    lines, code = failed_lines({0: said(lost), 1: Failure(-signal.SIGKILL)}, 2)
    assert lines == ["autofit: rank 1 stopped with signal SIGKILL"] and code == 128 + signal.SIGKILL
    lines, code = failed_lines({0: Failure(-signal.SIGTERM), 1: Failure(1, "To enable traceback see: ...")}, 2)
    assert lines == ["autofit: rank 0 stopped with signal SIGTERM", "autofit: rank 1 stopped with exit code 1"]
    assert code == 128 + signal.SIGTERM


def test_a_rank_writes_its_error_for_the_launcher_instead_of_printing(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(torchrun.LAUNCHED_ENV, raising=False)
    assert report_error("x") is False and not path.exists()  # a user's torchrun: rank 0 prints
    # ... but not a line that only repeats rank 1's failure: torchrun's summary holds both, rank 1's
    # as the root cause (stamped earlier). Session 12: rank 0 printed it, named the root cause
    from trainer.distributed.ranks import OTHER_FAILED
    told = f"rank 0: rank 1 {OTHER_FAILED}; stopping here too"
    before = time.time()
    assert report_error(told) is True
    written = json.loads(path.read_text())
    assert written["message"] == told and written["timestamp"] >= int(before) + 1
    path.unlink()
    monkeypatch.setenv("RANK", "1")
    assert report_error("x") is True  # ... and rank 1 leaves it to torchrun's failure summary
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(torchrun.LAUNCHED_ENV, "1")
    assert report_error("bad config") is True  # --nproc-per-node: every rank tells the launcher
    assert json.loads(path.read_text())["message"] == "bad config"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert report_error("y") is False  # no torchrun: printed as always


def test_a_rank_only_config_error_reaches_stderr_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOFIT_", "OMP_", "RANK", "WORLD_SIZE"))}
    env.update(AUTOFIT_HOME=str(tmp_path / "home"), AUTOFIT_RANK_BUDGETS="1B,1B", AUTOFIT_DIST_TIMEOUT="60",
               TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    # a budget of 1 byte leaves nothing to plan in after the margin: the launcher (which checks how many
    # entries there are, and that they have units) does not open a device; each rank refuses it
    proc = subprocess.run([sys.executable, "-m", "autofit", "run", "--nproc-per-node", "2", "--device", "cpu",
                           "--out", str(tmp_path / "o"), "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    # one line; "rank N: " when torchrun stopped the other rank (after the first one's error) before
    # it came to the same refusal: the launcher cannot know that it would have said it too
    assert len(errors) == 1 and re.fullmatch(r"autofit: error: (rank [01]: )?a CPU budget of 1 B leaves 0 B to plan "
                                             r"in after the 10% safety margin; give a budget that holds the model, "
                                             r"its optimizer state and a micro-batch", errors[0]), proc.stderr
    assert "interrupted" not in proc.stderr  # torchrun's SIGTERM to the slower rank is no news
    assert proc.stderr.splitlines()[0].startswith("OMP_NUM_THREADS=") and "*****" not in proc.stderr
    assert "Traceback" not in proc.stderr and "torch/distributed" not in proc.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # no torchelastic_* or launcher folder left behind


def test_the_vocab_line_is_said_once_the_launcher_said_it_for_the_ranks(tmp_path, monkeypatch):
    """Under --nproc-per-node the launcher checks the fresh run and says where vocab_size came from;
    its ranks (AUTOFIT_LAUNCHER set) do not say it again."""
    import pickle

    import numpy as np

    from autofit.cli.run_start import check_fresh_run
    from trainer.config.train_config import load_config
    data = tmp_path / "data" / "chars"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        (np.arange(200) % 30).astype(np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 30, "itos": {}, "stoi": {}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", overrides=["dataset=chars", "block_size=16", f"out_dir={tmp_path / 'o'}"])
    monkeypatch.delenv(torchrun.LAUNCHED_ENV, raising=False)
    said = []
    check_fresh_run(cfg, said.append)
    assert said == ["vocab_size 30, from data/chars/meta.pkl"]
    monkeypatch.setenv(torchrun.LAUNCHED_ENV, "1")
    said.clear()
    check_fresh_run(cfg, said.append)
    assert said == []


@pytest.mark.parametrize("launched", [True, False])
def test_torchruns_sigterm_to_a_rank_of_autofits_launcher_adds_no_line(monkeypatch, launched):
    """Under `autofit run --nproc-per-node` a rank's SIGTERM comes from torchrun, after another
    rank's error or the launcher's own stop, and the launcher says which: the rank unwinds (exit
    143) without a line of its own. Under a torchrun the user started, rank 0 still says it."""
    from autofit import interrupts
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    if launched:
        monkeypatch.setenv(torchrun.LAUNCHED_ENV, "1")
    else:
        monkeypatch.delenv(torchrun.LAUNCHED_ENV, raising=False)
    interrupts.reset()
    with pytest.raises(KeyboardInterrupt):
        torchrun._raise_interrupt(signal.SIGTERM, None)
    assert (interrupts.line() is None) == launched and interrupts.exit_code() == 143
    interrupts.reset()


def test_a_cause_is_said_once_and_consequences_only_when_nothing_else_is_known():
    lost = "rank {}: lost contact with another rank (Connection closed by peer); stopping here, the last checkpoint is kept"
    failed = "rank 0: rank 1 failed in this step (its own error says why); stopping here too"
    lines, code = failed_lines({0: said(failed), 1: said("rank 1: the loss is not finite at step 3")}, 2)
    assert lines == ["autofit: error: rank 1: the loss is not finite at step 3"] and code == 2
    lines, code = failed_lines({0: said(lost.format(0)), 1: said(lost.format(1)), 2: said(lost.format(2))}, 3)
    assert lines == [f"autofit: error: {lost.format(0)}"]  # each lost the others (a network fault): once
    # an evaluation's OOM at eval micro-batch 1 (trainer.evaluate): rank 1's own line, not rank 0's naming it
    named = "rank 1 ran out of memory in evaluation at step 4, at eval micro-batch 1 (its own error says why); stopping here too"
    own = "out of memory in evaluation at step 4, at eval micro-batch 1 (CUDA out of memory): give a larger budget"
    lines, _ = failed_lines({0: said(named), 1: said(own)}, 2)
    assert lines == [f"autofit: error: rank 1: {own}"]


def test_a_lost_peer_is_one_line_without_gloos_source_paths_nor_nested():
    from trainer.distributed.ranks import Ranks, peer_lost
    r = Ranks(rank=0, local_rank=0, world_size=2)
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:29500\nException raised from ...")
    line = str(peer_lost(gloo, r))
    assert line == ("rank 0: lost contact with another rank (Connection closed by peer [127.0.0.1]:29500); "
                    "stopping here, the last checkpoint is kept")
    assert str(peer_lost(peer_lost(gloo, r), r)) == line  # said once, not wrapped again
    # t10's M1: this rank's own OOM inside a collective (DDP's broadcast at wrap) is the cause, not a lost peer
    import torch
    from trainer.distributed.ranks import CONSEQUENCES
    oom = str(peer_lost(torch.OutOfMemoryError("budgeted CPU device out of memory: tried to allocate 84.4 KiB"), r))
    assert oom.startswith("rank 0: out of memory in a collective with the other ranks (budgeted CPU device out of "
                          "memory: tried to allocate 84.4 KiB)") and not any(w in oom for w in CONSEQUENCES)
    lines, _ = failed_lines({0: said(line), 1: said(oom.replace("rank 0", "rank 1"))}, 2)
    assert lines == [f"autofit: error: {oom.replace('rank 0', 'rank 1')}"]  # the cause, not rank 0's consequence


CTRL_C_IN_TORCH = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C finds it


class CtrlCInTorch:  # a real SIGINT, sent while torch's own __init__ imports the submodule named in argv
    def find_spec(self, name, path=None, target=None):
        if name == WHERE and "torch" in sys.modules and not getattr(self, "sent", False):
            self.sent = True
            print("SIGINT-SENT", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
        return None


WHERE = sys.argv.pop(1)
sys.meta_path.insert(0, CtrlCInTorch())
sys.argv = ["autofit"] + sys.argv[1:]
from autofit.__main__ import run
run()
"""


@pytest.mark.parametrize("rank,where", [(0, "torch._utils"), (0, "torch.nn"), (1, "torch.nn")])
def test_ctrl_c_while_a_rank_imports_torch_is_one_line_from_rank_0(tmp_path, rank, where):
    """h3 (session 10): a Ctrl-C in the first seconds of `run --nproc-per-node 2` landed in each
    rank's `import torch` (session()), then session()'s clean-up and the error report imported the
    half-built torch again: 110-220 lines of tracebacks. Now rank 0 says the one line, the other
    ranks nothing, exit code 130."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOFIT_", "RANK", "WORLD_SIZE"))}
    env.update(AUTOFIT_HOME=str(tmp_path / "home"), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]), TORCHELASTIC_ERROR_FILE=str(tmp_path / "e.json"),
               **{torchrun.LAUNCHED_ENV: "1"})
    proc = subprocess.run([sys.executable, "-c", CTRL_C_IN_TORCH, where, "run", "--device", "cpu", "--no-probe",
                           "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    said = ["autofit: interrupted while starting; nothing was done"] if rank == 0 else []
    assert proc.stderr.splitlines() == ["SIGINT-SENT", *said], proc.stderr[-3000:]
    assert proc.returncode == 130 and not (tmp_path / "e.json").exists()


def test_ranks_interrupted_on_their_own_are_one_line_or_none():
    """h3 (session 10): a Ctrl-C sent to rank 1 only stopped both ranks after the same step, rank 0
    said so, and the launcher added 'rank 0 stopped with exit code 130' and 'rank 1 ...'."""
    both = {0: Failure(130), 1: Failure(130)}
    assert failed_lines(both, 2, interrupt_said=True) == ([], 130)
    assert failed_lines(both, 2) == (["autofit: interrupted: rank 0, 1 stopped with exit code 130; no rank said "
                                      "it saved a checkpoint"], 130)
    # rank 0 stopped because its stdout was closed (141), rank 1 (agreed, no signal of its own) exited 0
    assert failed_lines({0: Failure(141)}, 2, interrupt_said=True) == ([], 141)
    assert failed_lines({0: Failure(141)}, 2)[1] == 141
    # a rank that died is still the cause, named first
    lines, code = failed_lines({0: Failure(130), 1: Failure(-signal.SIGKILL)}, 2, interrupt_said=True)
    assert lines == ["autofit: rank 1 stopped with signal SIGKILL"] and code == 128 + signal.SIGKILL


def test_ranks_stopped_by_sigterm_or_sighup_are_interrupted_and_their_code_is_kept():
    """A rank's stop exits 128 + the signal's number (143 SIGTERM, 129 SIGHUP), no longer 130 for
    every stop: the launcher still reads it as interrupted (no 'rank N stopped with exit code 143'
    line of a failure), and exits with the code of the signal: a rank that stopped for another's
    signal (rank 0 after a SIGTERM sent to rank 1 alone) heard none and exits 130."""
    assert failed_lines({0: Failure(143), 1: Failure(143)}, 2, interrupt_said=True) == ([], 143)
    assert failed_lines({0: Failure(130), 1: Failure(129)}, 2, interrupt_said=True) == ([], 129)
    assert failed_lines({0: Failure(130), 1: Failure(130)}, 2, interrupt_said=True) == ([], 130)
    assert failed_lines({1: Failure(129)}, 2) == (["autofit: interrupted: rank 1 stopped with exit code 129; no rank "
                                                   "said it saved a checkpoint"], 129)
    assert failed_lines({0: Failure(143), 1: Failure(130)}, 2) == (
        ["autofit: interrupted: rank 0, 1 stopped with exit codes 130, 143; no rank said it saved a checkpoint"], 143)


@pytest.mark.parametrize("rank0_said", [True, False])
def test_the_launchers_stop_line_says_only_what_it_knows(monkeypatch, capsys, rank0_said):
    """h3 (session 10): 'the ranks were told to checkpoint and stop' was printed for every stop of
    the launcher, after a SIGHUP that killed the ranks, a double Ctrl-C, a Ctrl-C in the probe:
    none of them wrote a checkpoint. Now rank 0's own line is the only one when it said one;
    else the launcher says the signal was passed on and that no rank reported a checkpoint."""
    import torch.distributed.run as tdr
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from autofit import interrupts

    def ranks_then_sighup(args):
        assert os.environ[torchrun.LAUNCHED_ENV] and os.environ[interrupts.SAID_ENV]
        if rank0_said:  # what rank 0 does after its 'interrupted after N step(s); checkpoint ...'
            interrupts.tell_launcher()
        raise SignalException("SIGHUP", signal.SIGHUP)
    monkeypatch.setattr(tdr, "run", ranks_then_sighup)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert launcher.relaunch(["run"], 2) == 128 + signal.SIGHUP
    err = capsys.readouterr().err
    assert err == "" if rank0_said else err == ("autofit: stopped by SIGHUP, passed on to the ranks; no rank said it "
                                                "saved a checkpoint\n")
    assert not os.path.exists(os.path.dirname(os.environ[interrupts.SAID_ENV]))  # the launcher's notes are gone


ORPHAN = """
import os, signal, sys, time
from autofit.launch.torchrun import LAUNCHED_ENV, die_with_launcher
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
launcher = os.getppid()
die_with_launcher()
print("READY", flush=True)
for _ in range(600):  # bounded: 60 s
    if got:
        break
    time.sleep(0.1)
for _ in range(600):  # until the last of the launcher's threads is gone: every death signal was sent
    if os.getppid() != launcher or os.environ[LAUNCHED_ENV] != str(launcher):
        break
    time.sleep(0.01)
time.sleep(0.01)  # the handlers of signals still pending run
print(f"SIGTERM x{len(got)}", flush=True)
"""
LAUNCHER = """
import os, subprocess, sys, threading, time
gone = sys.argv[1] == "gone"  # a launcher that died before the rank set its parent-death signal
os.environ[sys.argv[2]] = str(2**22 + 7 if gone else os.getpid())
for _ in range(4):  # torchrun's launcher has threads too: Linux signals a rank once for each as they die
    threading.Thread(target=time.sleep, args=(300,), daemon=True).start()
subprocess.run([sys.executable, "-c", sys.argv[3]], timeout=120)
"""


@pytest.mark.parametrize("launcher", ["killed", "gone"])
def test_a_rank_stops_when_its_launcher_dies(tmp_path, launcher):
    """h3 (session 10): a SIGKILL to `autofit run --nproc-per-node 2`'s launcher left both ranks
    training to the end as orphans, holding the out-dir lock. Each rank now gets one SIGTERM at
    its launcher's death (checkpoint and stop; a second would mean 'stop now'), at once if the
    launcher is already gone."""
    if not sys.platform.startswith("linux"):
        pytest.skip("prctl(PR_SET_PDEATHSIG) is Linux's")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, launcher, torchrun.LAUNCHED_ENV, ORPHAN], env=env,
                            stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline() == "READY\n"
        if launcher == "killed":
            proc.kill()  # the launcher, as `kill -9` would; the rank holds the pipe until it ends
            proc.wait(timeout=60)
        rest = proc.stdout.read()  # EOF once the rank ended (bounded by its loops)
    finally:
        proc.kill()
    assert rest == "SIGTERM x1\n", rest


def test_the_launchers_death_is_one_sigterm_however_often_linux_says_it(monkeypatch):
    """Linux sends the parent-death signal again as each of the dying launcher's threads exits
    (seen in a real 2-rank run: each rank got SIGTERM twice, took the second as 'stop now' and
    wrote no checkpoint). The ranks' death signal is turned into one SIGTERM."""
    got = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    monkeypatch.setitem(torchrun._death, "told", False)
    try:
        for _ in range(3):
            torchrun._launcher_died(torchrun.DEATH_SIGNAL, None)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got == [signal.SIGTERM]


@dataclass
class Killed(Failure):
    pid: int = 4242


def test_torchruns_own_sigkill_of_a_stuck_rank_is_not_the_cause():
    """h3 (session 10): rank 1 stuck, rank 0 gave up on it ('lost contact ... Timed out'), then
    torchrun's shutdown killed rank 1 with SIGKILL after 30 s; the launcher said only 'rank 1
    stopped with signal SIGKILL', as if that were the cause, and left rank 0's line out."""
    lost = "rank 0: lost contact with another rank (Timed out waiting 15000ms); stopping here, the last checkpoint is kept"
    failures = {0: said(lost), 1: Killed(-signal.SIGKILL, pid=4242)}
    lines, code = failed_lines(failures, 2, killed={4242})
    assert lines == [f"autofit: error: {lost}", "autofit: rank 1 did not stop when torchrun asked it to after the "
                                                "failure, and was killed (SIGKILL; stuck?)"] and code == 2
    # a SIGKILL torchrun did not send (the OOM killer's) is still the cause
    assert failed_lines(failures, 2, killed={99}) == (["autofit: rank 1 stopped with signal SIGKILL"], 128 + 9)


def _ignore_stop_signals():
    for sig in (signal.SIGINT, signal.SIGTERM):  # ignored across exec: no window before the child runs
        signal.signal(sig, signal.SIG_IGN)


def _sleeping_ranks(n):
    """torchrun's handlers of n ranks that would never end (stuck: stop signals change nothing), each
    in its own session as torchrun starts them (its close() signals the rank's process group)."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler
    procs = []
    for _ in range(n):
        h = SubprocessHandler.__new__(SubprocessHandler)
        h._stdout = h._stderr = None
        h.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                                  preexec_fn=_ignore_stop_signals)
        procs.append(h)
    return procs


def test_the_launcher_knows_which_ranks_torchrun_killed():
    from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler
    procs = _sleeping_ranks(2)
    seen = launcher.Shutdown()
    try:
        with launcher._watching_torchrun(seen):
            procs[0].close(death_sig=signal.SIGTERM)  # torchrun's first, polite signal: not recorded
            procs[1].close(death_sig=signal.SIGKILL)  # ... its forced one, past the 30 s
    finally:
        for h in procs:
            h.proc.kill()
            h.proc.wait(timeout=60)
    assert seen.killed == {procs[1].proc.pid} and SubprocessHandler.close.__name__ == "close"  # put back


def test_a_slow_stop_is_said_and_a_second_ctrl_c_kills_the_ranks(capsys):
    """A rank stuck in a collective answers nothing: the first Ctrl-C was unanswered until torchrun's
    SIGKILL (30 s), and a second one made torchrun abandon its shutdown, leaving the stuck ranks
    running without a launcher (session 11). Now a stop not done after a while is said, and a
    second signal kills the ranks at once. Timings injected: the notice's delay is 0 and its timer
    is joined."""
    from torch.distributed.elastic.multiprocessing import api
    procs = _sleeping_ranks(2)
    seen = launcher.Shutdown()
    try:
        with launcher._watching_torchrun(seen, notice_after_s=0) as notice:
            with pytest.raises(api.SignalException):  # the first: torchrun's own handler, then its shutdown
                api._terminate_process_handler(signal.SIGINT, None)
            for h in procs:
                h.close(death_sig=signal.SIGINT)  # what its shutdown does first; the ranks do not end
            notice.join(timeout=60)
            assert "still waiting for the ranks to finish their step" in capsys.readouterr().err
            api._terminate_process_handler(signal.SIGINT, None)  # the second: no exception, the ranks killed
        codes = [h.proc.wait(timeout=60) for h in procs]
    finally:
        for h in procs:
            h.proc.kill()
            h.proc.wait(timeout=60)
    assert codes == [-signal.SIGKILL] * 2 and seen.second_signal
    assert seen.killed == {h.proc.pid for h in procs}
    assert api._terminate_process_handler.__name__ == "_terminate_process_handler"  # put back


def test_a_ranks_bad_budget_names_its_rank_once_and_advice_names_the_variable(monkeypatch):
    """t2 (session 11): 'rank 0: AUTOFIT_RANK_BUDGETS: rank 0's budget 'abc': ...' said the rank
    twice; 'nothing fits ... a larger --budget would help' where the ranks' budgets came from
    AUTOFIT_RANK_BUDGETS, which --budget cannot be given beside."""
    from autofit.devices.info import DeviceError
    from autofit.devices.ranks import budget_flag, rank_budget
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "AUTOFIT_RANK_BUDGETS": "abc,2MiB"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DeviceError) as e:
        rank_budget(None)
    msg = str(e.value)
    assert msg == "rank 0: its budget in AUTOFIT_RANK_BUDGETS, 'abc': not a size: 'abc' (examples: 2GiB, 1.5G, 512MiB, 4096)"
    assert torchrun.error_prefix(msg) == "" and budget_flag() == "AUTOFIT_RANK_BUDGETS"
    monkeypatch.delenv("AUTOFIT_RANK_BUDGETS")
    assert budget_flag() == "--budget"


def test_a_bare_number_in_rank_budgets_is_a_missing_unit_as_in_budget(monkeypatch):
    """AUTOFIT_RANK_BUDGETS=3,2 was read as 3 and 2 bytes, where --budget 3 is refused as a missing
    unit (autofit.units.missing_unit): each rank's entry now follows --budget's rule, and the
    launcher checks every entry before torchrun starts (check_rank_budgets)."""
    from autofit.devices.info import DeviceError
    from autofit.devices.ranks import check_rank_budgets, rank_budget
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "AUTOFIT_RANK_BUDGETS": "3MiB,2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DeviceError) as e:
        rank_budget(None)
    assert str(e.value) == ("rank 1: its budget in AUTOFIT_RANK_BUDGETS, '2': 2 is 2 bytes: give a unit, e.g. 2GiB "
                            "(or 2B for bytes)")
    for given, want in (("3MiB,2B", 2), ("3MiB,2097152", 2 * 2**20), ("3MiB, 2MiB", 2 * 2**20)):  # as --budget reads them
        monkeypatch.setenv("AUTOFIT_RANK_BUDGETS", given)
        assert rank_budget(None) == want
        assert check_rank_budgets(2) == [3 * 2**20, want]
    for given, line in (("3,2", "AUTOFIT_RANK_BUDGETS=3,2: rank 0's budget, '3': 3 is 3 bytes: give a unit, e.g. "
                                "3GiB (or 3B for bytes)"),
                        ("3MiB,256", "AUTOFIT_RANK_BUDGETS=3MiB,256: rank 1's budget, '256': 256 is 256 bytes: give a "
                                     "unit, e.g. 256MiB (or 256B for bytes)"),
                        ("3MiB,abc", "AUTOFIT_RANK_BUDGETS=3MiB,abc: rank 1's budget, 'abc': not a size: 'abc' "
                                     "(examples: 2GiB, 1.5G, 512MiB, 4096)")):
        monkeypatch.setenv("AUTOFIT_RANK_BUDGETS", given)
        with pytest.raises(DeviceError) as e:
            check_rank_budgets(2)
        assert str(e.value) == line
    monkeypatch.delenv("AUTOFIT_RANK_BUDGETS")
    assert check_rank_budgets(2) is None  # not set: nothing to check


def test_the_launcher_counts_the_rank_budgets_before_torchrun_starts(monkeypatch):
    """One entry for two ranks was each rank's to find, after torchrun had started them: the
    launcher says it, naming the variable, its count and --nproc-per-node, with an example of the
    right length made of the user's own entries. A user's own torchrun still has each rank's check."""
    from autofit.devices.info import DeviceError
    from autofit.devices.ranks import check_rank_budgets, rank_budget
    for given, nproc, line in (
            ("3MiB", 2, "AUTOFIT_RANK_BUDGETS=3MiB names 1 budget for --nproc-per-node 2; give one per rank, "
                        "comma-separated, e.g. AUTOFIT_RANK_BUDGETS=3MiB,3MiB"),
            ("3MiB,2MiB,1MiB", 2, "AUTOFIT_RANK_BUDGETS=3MiB,2MiB,1MiB names 3 budgets for --nproc-per-node 2; give "
                                  "one per rank, comma-separated, e.g. AUTOFIT_RANK_BUDGETS=3MiB,2MiB"),
            ("3MiB,2MiB", 3, "AUTOFIT_RANK_BUDGETS=3MiB,2MiB names 2 budgets for --nproc-per-node 3; give one per "
                             "rank, comma-separated, e.g. AUTOFIT_RANK_BUDGETS=3MiB,2MiB,2MiB"),
            # r8: an empty entry was 'rank 1's budget', a rank --nproc-per-node 1 does not start
            ("3MiB,", 1, "AUTOFIT_RANK_BUDGETS=3MiB,: entry 2 of 2 is empty (a comma too many?); give one size per "
                         "rank, comma-separated, e.g. AUTOFIT_RANK_BUDGETS=3MiB"),
            ("1GiB,512MiB,", 2, "AUTOFIT_RANK_BUDGETS=1GiB,512MiB,: entry 3 of 3 is empty (a comma too many?); give "
                                "one size per rank, comma-separated, e.g. AUTOFIT_RANK_BUDGETS=1GiB,512MiB"),
            (" , ", 2, "AUTOFIT_RANK_BUDGETS=,: entry 1 of 2 is empty (a comma too many?); give one size per rank, "
                       "comma-separated"),
            ("3MiB,2MiB", 9, "AUTOFIT_RANK_BUDGETS=3MiB,2MiB names 2 budgets for --nproc-per-node 9; give one per "
                             "rank, comma-separated")):
        monkeypatch.setenv("AUTOFIT_RANK_BUDGETS", given)
        with pytest.raises(DeviceError) as e:
            check_rank_budgets(nproc)
        assert str(e.value) == line
    monkeypatch.setenv("AUTOFIT_RANK_BUDGETS", "3MiB,2MiB,1GiB")
    assert check_rank_budgets(3) == [3 * 2**20, 2 * 2**20, 2**30]
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)  # a torchrun of the user's: no launcher counted them
    with pytest.raises(DeviceError, match=r"^AUTOFIT_RANK_BUDGETS names 3 budgets for 2 ranks; give one per rank"):
        rank_budget(None)


@pytest.mark.parametrize("budgets, line", [
    ("3,2", "AUTOFIT_RANK_BUDGETS=3,2: rank 0's budget, '3': 3 is 3 bytes: give a unit, e.g. 3GiB (or 3B for bytes)"),
    ("3MiB", "AUTOFIT_RANK_BUDGETS=3MiB names 1 budget for --nproc-per-node 2; give one per rank, comma-separated, "
             "e.g. AUTOFIT_RANK_BUDGETS=3MiB,3MiB"),
])
def test_nproc_per_node_refuses_bad_rank_budgets_before_torchrun_starts(tmp_path, budgets, line):
    """One line naming the variable and the entry (or the count and N), exit 2, and no rank started
    (torchrun's launcher says its OMP_NUM_THREADS line first), nothing written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOFIT_", "OMP_", "RANK", "WORLD_SIZE"))}
    env.update(AUTOFIT_HOME=str(tmp_path / "home"), AUTOFIT_RANK_BUDGETS=budgets)
    proc = subprocess.run([sys.executable, "-m", "autofit", "run", "--nproc-per-node", "2", "--device", "cpu",
                           "--preset", "tiny", "--out", str(tmp_path / "o"), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == [f"autofit: error: {line}"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "home").exists()


def test_nproc_per_node_counts_the_rank_budgets_against_the_machines_memory(tmp_path):
    """Two entries that each fit this machine, and together do not: the launcher counted only
    --budget, so torchrun started ranks whose budgets the machine could not give them both."""
    from autofit.devices.cpu import RANK_PROCESS_BYTES, machine_memory_bytes
    from autofit.units import fmt_bytes
    have = machine_memory_bytes()
    if have is None:
        pytest.skip("this machine's memory cannot be read")
    each = have * 3 // 5  # under the machine's memory: each rank's own check passes it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOFIT_", "OMP_", "RANK", "WORLD_SIZE"))}
    env.update(AUTOFIT_HOME=str(tmp_path / "home"), AUTOFIT_RANK_BUDGETS=f"{each}B,{each}B")
    proc = subprocess.run([sys.executable, "-m", "autofit", "run", "--nproc-per-node", "2", "--device", "cpu",
                           "--preset", "tiny", "--out", str(tmp_path / "o"), "--no-progress", "--max-steps", "1"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    need = 2 * (each + RANK_PROCESS_BYTES)
    assert proc.stderr.splitlines() == [
        f"autofit: error: --nproc-per-node 2: the ranks' AUTOFIT_RANK_BUDGETS budgets ({fmt_bytes(2 * each)} in all) "
        f"and their processes (~{fmt_bytes(RANK_PROCESS_BYTES)} each, assumed) need {fmt_bytes(need)}, more than this "
        f"machine's memory ({fmt_bytes(have)}, physical RAM or the container's limit); give the ranks at most "
        f"{fmt_bytes(have - 2 * RANK_PROCESS_BYTES)} in all"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "home").exists()


def test_torchruns_signal_handlers_do_not_outlive_its_run():
    """torchrun's PContext.start installs its handler for SIGINT, SIGTERM, SIGHUP and SIGQUIT and
    leaves it: a Ctrl-C while the launcher exited after run() raised torchrun's SignalException, a
    traceback instead of the one line. The handlers in place before run() are put back."""
    from torch.distributed.elastic.multiprocessing import api
    before = {sig: signal.getsignal(sig) for sig in launcher._TORCHRUN_SIGNALS}
    with launcher._watching_torchrun(launcher.Shutdown()):
        for sig in launcher._TORCHRUN_SIGNALS:  # as PContext.start does
            signal.signal(sig, api._terminate_process_handler)
    assert {sig: signal.getsignal(sig) for sig in launcher._TORCHRUN_SIGNALS} == before


@pytest.mark.parametrize("told, name, kept", [
    (True, f"{torchrun.NOTES_PREFIX}4242-abc123", False),  # its launcher died: removed by the rank
    (False, f"{torchrun.NOTES_PREFIX}4242-abc123", True),  # a live launcher removes its own
    (True, f"{torchrun.NOTES_PREFIX}999-abc123", True),  # not this rank's launcher's
    (True, "my-data", True),  # not a launcher's folder at all
])
def test_a_rank_removes_its_dead_launchers_folder(monkeypatch, tmp_path, told, name, kept):
    """A launcher killed with SIGKILL left its folder in /tmp until the next launch (session 11,
    checked by hand in session 12); its ranks outlive it for their checkpoint and remove it."""
    from autofit import interrupts
    folder = tmp_path / name
    (folder / "torchrun").mkdir(parents=True)
    monkeypatch.setenv(interrupts.SAID_ENV, str(folder / "said"))
    monkeypatch.setenv(torchrun.LAUNCHED_ENV, "4242")
    monkeypatch.setitem(torchrun._death, "told", told)
    torchrun._remove_dead_launchers_folder()
    assert folder.is_dir() == kept


@pytest.mark.parametrize("argv, words", [
    (["run", "--out", "o"], "no rank said it saved a checkpoint"),
    (["probe", "--device", "cpu"], "the probe was stopped and nothing was saved"),
    (["probe", "--save"], "the probe was stopped, and no rank said it wrote its plan (--save and --plot write it "
                          "only after the probe)"),
    (["probe", "--plot=p.png"], "the probe was stopped, and no rank said it wrote its plan"),
])
def test_the_launchers_stop_line_fits_the_command(monkeypatch, capsys, argv, words):
    """t4 (session 13): a Ctrl-C at a 2-rank probe's first trial once ended with 'no rank said it
    saved a checkpoint': a probe writes no checkpoint. When rank 0 says nothing, the launcher's
    line says what the command it launched keeps."""
    import torch.distributed.run as tdr
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def ranks_then_sigint(args):
        raise SignalException("SIGINT", signal.SIGINT)
    monkeypatch.setattr(tdr, "run", ranks_then_sigint)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert launcher.relaunch(argv, 2) == 130
    err = capsys.readouterr().err
    assert err.startswith("autofit: stopped by SIGINT, passed on to the ranks; " + words), err
    assert ("checkpoint" in err) == (argv[0] == "run")
    # the ranks' own exit code 130 with no line: the same words
    lines, code = failed_lines({0: Failure(130)}, 1, unsaid=launcher.unsaid_words(argv))
    assert len(lines) == 1 and lines[0].startswith(f"autofit: interrupted: rank 0 stopped with exit code 130; {words}")
    assert code == 130


def test_a_stop_the_ranks_did_not_report_names_the_earlier_checkpoint_that_resumes(tmp_path, monkeypatch, capsys):
    """t12's L6 (session 18): a double Ctrl-C under --nproc-per-node 2 said only 'no rank said it
    saved a checkpoint', though ckpt.pt (step 20) was in the folder and --resume continued from
    it. The launcher's line now names it and its step; a file that does not read is not named."""
    import torch
    import torch.distributed.run as tdr
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from trainer.config.train_config import load_config
    from trainer.loop import RunOptions, train
    out = tmp_path / "out"
    cfg = load_config(preset="tiny", overrides=["n_layer=1", "n_embd=16", "n_head=2", "block_size=16",
                                                "batch_size=2", "gradient_accumulation_steps=1", "max_iters=3",
                                                "eval_interval=0", f"out_dir={out}", "device=cpu"])
    train(cfg, RunOptions(device=torch.device("cpu"), progress=False))

    def ranks_then_sigint(args):
        raise SignalException("SIGINT", signal.SIGINT)
    monkeypatch.setattr(tdr, "run", ranks_then_sigint)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert launcher.relaunch(["run", "--out", str(out)], 2, ckpt=out / "ckpt.pt") == 130
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"no rank said it saved a checkpoint; {out / 'ckpt.pt'} holds step 3 (saved "
                                 f"earlier): --resume continues from it"), err
    lines, _ = failed_lines({0: Failure(130)}, 1, unsaid=launcher.unsaid_words(["run"], out / "ckpt.pt"))
    assert lines[0].endswith("holds step 3 (saved earlier): --resume continues from it"), lines
    assert launcher.unsaid_words(["probe", "--save"], out / "ckpt.pt").startswith("the probe was stopped")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    for path in (tmp_path / "bad.pt", tmp_path / "none.pt", None):
        assert launcher.unsaid_words(["run"], path) == "no rank said it saved a checkpoint"
