"""What the training loop does differently when torchrun starts several ranks, in one place so
that trainer/loop.py keeps the shape of a one-GPU loop with a few calls into it.

With one process every method here is a no-op (or the identity), so a one-GPU run is unchanged.
With several: the process group is joined (and left at the end), the model is wrapped (DDP or
FSDP2, trainer.distributed.sharding), every attempt at a step ends in an agreement among the ranks
(trainer.distributed.ranks.Agreement), the logged losses and evaluation results are the mean over the
ranks, and a checkpoint carries every rank's RNG state (and, under FSDP2, the whole model
gathered to rank 0).
"""
from __future__ import annotations

import torch

from trainer.distributed import ranks as D
from trainer.distributed.shares import check_divisible
from trainer.errors import TrainError
from trainer.distributed.sharding import wrap


def pick_device(config_device: str, ranks: D.Ranks | None = None) -> torch.device:
    """The config's device ('auto', 'cpu', 'cuda', 'cuda:1'); with several ranks, a bare 'cuda' is
    this rank's GPU (LOCAL_RANK). Raises TrainError for CUDA when torch sees no GPU."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config_device == "auto" else config_device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {config_device!r} asked for, but torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is None and ranks is not None and ranks.several:
        dev = torch.device("cuda", ranks.local_rank)
    return dev


def same_data(data, ranks: D.Ranks) -> None:
    """RankGroup.check_same_data: every rank's fingerprints of `data` (a TokenDataset) gathered,
    compared with rank 0's.
    Why: each rank opens its own copy of the dataset (on several nodes, each node's disk), and
    keeps its own rows of a step batch drawn by position; a copy prepared from other text, or cut
    short, gave its ranks other sequences than rank 0 drew, with nothing said."""
    if not ranks.several:
        return
    from trainer.data.tokenfiles import fingerprint, fingerprint_change
    every = D.all_gather_objects({s: fingerprint(data.split(s).parts) for s in data.splits}, ranks)
    for r, theirs in enumerate(every):
        change = fingerprint_change(every[0], theirs) or fingerprint_change(theirs, every[0])
        if change:
            raise TrainError(f"rank {ranks.rank}: rank {r} reads other data than rank 0 ({change}); every rank "
                             f"must read the same dataset (copy rank 0's to every node)")


def unused_parallelism(parallelism: str, world_size: int, *, mine: bool, resized: bool) -> str | None:
    """The line for a config's parallelism ('ddp', 'fsdp2') run on one process, which trains
    without it (not an error); `mine`: set by this command, not the resumed checkpoint's. None
    where there is nothing to say: 'auto', several ranks, or a checkpoint of several ranks resumed
    on one (`resized`), which its 'resumed on 1 rank' line already says (t12's L4: the note read as
    a warning about the user's choice, and said DDP shares the model, which it copies)."""
    if parallelism == "auto" or world_size > 1 or (resized and not mine):
        return None
    whose = "parallelism =" if mine else "the checkpoint's parallelism"
    return (f"{whose} '{parallelism}' is for several ranks; this run has one process, so it trains without it "
            f"(--nproc-per-node N to train on N)")


class RankGroup:
    """The ranks of one training run, as the loop sees them. `parallelism`: 'ddp' or 'fsdp2'
    (used with several ranks only). Raises TrainError when the ranks cannot be joined, or the
    effective batch does not divide among them."""

    def __init__(self, ranks: D.Ranks, device: torch.device, effective_batch: int, parallelism: str = "ddp"):
        self.ranks = ranks
        self.device = device
        # 'auto' without a plan is DDP (the probe decides when FSDP2 is worth it)
        self.parallelism = ("ddp" if parallelism == "auto" else parallelism) if ranks.several else "single"
        check_divisible(effective_batch, ranks.world_size)
        self.owns_group = D.start(device.type, ranks)
        self.agreement = D.Agreement(ranks) if ranks.several else None
        self.parallel = None  # trainer.distributed.sharding's wrapper, once wrap_model has run

    @property
    def several(self) -> bool:
        return self.ranks.several

    def rows(self, step_batch: int) -> slice:
        return self.ranks.rows(step_batch)

    # ------------------------------------------------------------------ model and step
    def wrap_model(self, model: torch.nn.Module, seed: int) -> None:
        """Wraps the model (before the optimizer is made: FSDP2 shards the parameters). Every
        rank built the same weights from the same seed; dropout then draws from seed + rank,
        as nanoGPT seeds each rank."""
        if not self.several:
            return
        self.parallel = wrap(self.parallelism, model, self.device, self.ranks, self.agreement)
        torch.manual_seed(seed + self.ranks.rank)

    def forward(self, forward: torch.nn.Module) -> torch.nn.Module:
        """The module the step calls: the DDP wrapper, or `forward` itself."""
        return forward if self.parallel is None or self.parallel.kind != "ddp" else self.parallel.module

    @property
    def sync(self):
        return self.parallel

    def watch(self, stop) -> None:
        """A Ctrl-C / SIGTERM on any rank stops every rank after the same step."""
        if self.agreement is not None:
            self.agreement.stop_wanted = lambda: stop.signal is not None

    def stop_now(self, stop) -> bool:
        if self.agreement is None:
            return stop.signal is not None
        return self.agreement.agreed_stop

    def after_oom(self, exc_info: dict) -> tuple[bool, int | None]:
        """After an OOM in an attempt, once this rank's memory is cleaned up: the ranks agree on
        the attempt's outcome, unless the OOM came from that agreement already (exc_info:
        {'injected': bool, 'agreed': bool, 'other': the OOM was another rank's, met in a check-in
        of this rank's step (FSDP2): this rank enters no failure of its own, as under DDP, where
        it learns of it in the step's settle; 'rank': the rank such an agreed OOM names}).
        Returns (whether every OOM of the attempt was injected, the rank that ran out: the
        highest where several did, as the agreement names it (ranks.oom_rank); None with one
        process). Raises RankFailed when another rank failed otherwise."""
        if not self.several:
            return exc_info["injected"], None
        if exc_info["agreed"]:
            return exc_info["injected"], exc_info.get("rank")
        mine = None if exc_info.get("other") else "injected" if exc_info["injected"] else "oom"
        seen = self.agreement.outcome(mine)
        if seen[D.ERROR]:
            D.raise_for(seen, self.ranks, self.agreement.reason)
        return not seen[D.REAL_OOM], D.oom_rank(seen)

    def primed(self, oom: bool) -> None:
        """After this rank made the optimizer's state before step 0 (`oom`: it ran out of memory
        doing so, and raises its own TrainError next): the ranks agree on whether the state fit on
        every one, in one agreement round that every rank enters (a rank whose priming failed
        otherwise enters it through `failed`). No rank shrinks and redoes: the state's size does not
        depend on the micro-batch. Raises RankFailed on a rank whose state fit when another rank's
        did not (naming that rank), or when another rank failed otherwise."""
        if not self.several:
            return
        seen = self.agreement.outcome("oom" if oom else None)
        if seen[D.ERROR]:
            D.raise_for(seen, self.ranks, self.agreement.reason)
        if not oom and (seen[D.REAL_OOM] or seen[D.INJECTED_OOM]):
            raise D.RankFailed(f"rank {self.ranks.rank}: {D.failed_rank(seen)} {D.OTHER_PRIME_OOM}; stopping here too")

    def rewrap(self, forward: torch.nn.Module) -> None:
        """A clean wrapper around `forward` after an OOM or a compile switch (every rank at once)."""
        if self.parallel is not None:
            self.parallel.rewrap(forward)

    def failed(self, exc: BaseException) -> TrainError | None:
        """Another error in this rank's attempt: the others are told (so none waits for this
        rank), and a lost peer becomes one line. Returns the TrainError to raise instead of
        `exc`, or None to raise `exc` itself."""
        if not self.several:
            return None
        if D.is_peer_failure(exc):
            return D.peer_lost(exc, self.ranks)
        if not isinstance(exc, (D.RankFailed, TrainError)) and not getattr(exc, "agreed", False):
            self.agreement.outcome("error", D.first_line(exc))  # its line, which the others then say
        return None

    def eval_agree(self, oom: bool) -> int | None:
        """After one evaluation batch: the rank that ran out of memory on it (the highest where
        several did, as a step's agreement names it: ranks.oom_rank), None when none did; then
        every rank halves its eval micro-batch and redoes the batch, or at eval micro-batch 1
        stops, naming that rank. With several ranks this is an Agreement outcome, which also
        answers FSDP2's per-block check-ins of a rank still inside its forward; after an OOM,
        FSDP2's blocks go back to their shards. Raises RankFailed when another rank failed
        otherwise (its line, as after a step)."""
        if not self.several:
            return self.ranks.rank if oom else None
        seen = self.agreement.outcome("oom" if oom else None)
        if seen[D.ERROR]:
            D.raise_for(seen, self.ranks, self.agreement.reason)
        who = D.oom_rank(seen)
        if who is not None and self.parallel is not None and self.parallel.kind == "fsdp2":
            self.parallel.rewrap()
        return who

    def eval_hooks(self) -> dict:
        """The Evaluator's keywords for these ranks (trainer.evaluate): its OOM agreement, its
        share of the eval batches (under DDP the ranks split them: the model each evaluates is
        the unwrapped module, whose forward needs no other rank; under FSDP2 every rank runs every
        forward), the sum over the ranks, and how a DataError reading a batch is told."""
        split = self.several and self.parallelism == "ddp"
        return {"agree": self.eval_agree, "share": (self.ranks.rank, self.ranks.world_size) if split else (0, 1),
                "total": self.sum_floats, "failed": self.failed}

    def sum_floats(self, values: list[float]) -> list[float]:
        """The element-wise sums of `values` over the ranks (float64 on the host, through gloo);
        `values` itself with one rank. Collective."""
        if not self.several:
            return values
        out = torch.tensor(values, dtype=torch.float64)  # a sum, not mean * W: no rounding of its own
        try:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        except Exception as e:
            raise D.peer_lost(e, self.ranks) from None
        return out.tolist()

    def check_same_data(self, data) -> None:
        """Every rank must read the same tokens (`data`: the TokenDataset, compared by each split's
        trainer.data.tokenfiles.fingerprint), or their rows of one step batch would not be the
        sequences one process draws. Collective. Raises TrainError naming a rank that differs."""
        same_data(data, self.ranks)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (collective with several ranks)."""
        return D.any_over_ranks(flag, self.ranks)

    # ------------------------------------------------------------------ figures
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a device tensor (each rank's losses are its own rows')."""
        return D.mean_over_ranks(t, self.ranks)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_extra(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         micro_batches: list[int]) -> dict:
        """What a checkpoint adds with several ranks: the world size and parallelism, every
        rank's RNG state and micro-batches, and under FSDP2 the whole model and optimizer
        gathered to rank 0. Collective: every rank calls it."""
        if not self.several:
            return {}
        rng = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        states = D.all_gather_objects((rng, cuda, list(micro_batches)), self.ranks)
        extra = {"world_size": self.ranks.world_size, "parallelism": self.parallelism,
                 "rng_ranks": [s[0] for s in states], "rank_micro_batches": [s[2] for s in states],
                 "rng_cuda_ranks": [s[1] for s in states] if cuda is not None else None}
        if self.parallel.kind == "fsdp2":
            full = self.parallel.full_state(optimizer)
            extra.update(model=full["model"], optimizer=full["optimizer"], optimizer_keys="names")
        return extra

    def load(self, ck: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Model and optimizer state from a checkpoint (any world size, DDP or FSDP2 or one
        GPU) into this run's model, whichever way it is wrapped."""
        by_name = ck.get("optimizer_keys") == "names"
        if self.parallel is not None and self.parallel.kind == "fsdp2":
            from trainer.model.gpt import clean_state_dict
            if not by_name:
                raise TrainError("resuming an FSDP2 run from a checkpoint written without FSDP2 is not "
                                 "supported; resume it with --set parallelism=ddp")
            self.parallel.load_state(optimizer, clean_state_dict(ck["model"]), ck["optimizer"])
            return
        from trainer.model.gpt import clean_state_dict
        model.load_state_dict(clean_state_dict(ck["model"]))
        if by_name:  # an FSDP2 checkpoint, read without FSDP2
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, ck["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(ck["optimizer"])

    def rng_state(self, ck: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's RNG state from a checkpoint: its own when the world size is unchanged,
        else rank 0's, and on every other rank a state seeded from it plus the rank, so ranks draw
        different dropout masks, as a fresh run's seed + rank does (the masks then differ from the
        first run's)."""
        saved = ck.get("rng_ranks")
        cuda = ck.get("rng_cuda_ranks")
        if saved is not None and len(saved) == self.ranks.world_size:
            return saved[self.ranks.rank], (cuda[self.ranks.rank] if cuda else None)
        if self.ranks.rank == 0:
            return ck["rng_cpu"], ck.get("rng_cuda")
        g = torch.Generator()
        g.set_state(ck["rng_cpu"].cpu())
        seed = int(torch.randint(0, 2**62, (1,), generator=g)) + self.ranks.rank
        on_cuda = ck.get("rng_cuda") is not None and torch.cuda.is_available()
        return (torch.Generator().manual_seed(seed).get_state(),
                torch.Generator(device="cuda").manual_seed(seed).get_state() if on_cuda else None)

    def split_change(self, ck: dict, effective_batch: int, micro_batches: list[int]) -> dict | None:
        """The fields of a 'world_size_changed' event when the checkpoint was written by another
        number of ranks: each rank's share changes (and the effective batch, where a resume with
        --allow-changes changed it too: the old share is the checkpoint's micro-batches')."""
        before = int(ck.get("world_size", 1))
        if before == self.ranks.world_size:
            return None
        old_share = sum(ck.get("micro_batches") or []) or effective_batch // before
        return {"old_world_size": before, "new_world_size": self.ranks.world_size,
                "old_effective_batch": old_share * before,
                "effective_batch": effective_batch, "old_rank_batch": old_share,
                "new_rank_batch": effective_batch // self.ranks.world_size,
                "old_micro_batches": list(ck.get("micro_batches", [])), "micro_batches": list(micro_batches)}

    def close(self) -> None:
        """Leaves the process group when this run joined it."""
        if self.owns_group:
            D.stop()
            self.owns_group = False
