"""The search space of a probe: dtype x compile x activation checkpointing (how often, and which
policy: full or selective) x loss implementation, from the config's own choices widened by the
memory levers."""
from __future__ import annotations

from dataclasses import dataclass, field

from autofit.records import Candidate
from trainer.config.messages import did_you_mean
from trainer.step import bf16_refusal, no_bf16_words
from trainer.errors import counted


class PlanError(RuntimeError):
    """Nothing fits, or the search space is empty."""


@dataclass
class Space:
    dtypes: list[str]
    compile: list[bool]
    checkpointing: list[int]  # 0 off, k: every k-th block recomputes its activations
    loss_impls: list[str]
    sharded: list[bool] = field(default_factory=lambda: [False])  # several ranks: FSDP2 tried too
    # what a checkpointed block keeps (checkpointing > 0 only): 'full' its input, 'selective' also
    # its matmul and attention outputs (trainer/model/sac_ops.py)
    checkpointing_policies: list[str] = field(default_factory=lambda: ["full"])
    notes: list[str] = field(default_factory=list)  # levers left out of the search, and why (probe -v)


@dataclass(frozen=True)
class Levers:
    """One lever combination; the micro-batch search runs once per combination (eager)."""
    dtype: str
    checkpointing: int
    loss_impl: str
    sharded: bool = False  # FSDP2 on several ranks
    checkpointing_policy: str = "full"  # 'full' or 'selective'; always 'full' without checkpointing

    def candidate(self, micro_batch: int, compile: bool = False) -> Candidate:
        return Candidate(micro_batch=micro_batch, dtype=self.dtype, compile=compile,
                         checkpointing=self.checkpointing, loss_impl=self.loss_impl, sharded=self.sharded,
                         checkpointing_policy=self.checkpointing_policy)

    @classmethod
    def of(cls, t) -> "Levers":
        """The levers of a Candidate or TrialRecord."""
        return cls(t.dtype, t.checkpointing, t.loss_impl, t.sharded, t.checkpointing_policy)

    def estimate_args(self) -> dict:
        """estimate_peak's lever arguments (autofit.planning.estimate) for this combination."""
        return {"dtype": self.dtype, "checkpointing": self.checkpointing, "loss_impl": self.loss_impl,
                "checkpointing_policy": self.checkpointing_policy}


def error_lines(trials, listed: bool = False) -> list[str]:
    """One line per lever combination (and compile) with trials that failed with an error that is
    not out of memory (status 'error': a bug in a loss or checkpointing path, an op this torch
    lacks), naming the count and the first error: such a combination did not lose on memory or
    speed, so the plan and the default output say it (the -v table lists each trial; `listed`: it
    is shown, so the line does not point to it)."""
    groups: dict[tuple, list] = {}
    for t in trials:
        if t.status == "error":
            groups.setdefault((Levers.of(t), t.compile), []).append(t)
    out = []
    for (lv, compiled), errs in groups.items():
        ck = f", checkpointing every {lv.checkpointing} ({lv.checkpointing_policy})" if lv.checkpointing else ""
        what = f"{lv.loss_impl} loss{ck}, {lv.dtype}" + (", compiled" if compiled else "") + (", FSDP2" if lv.sharded else "")
        first = ((errs[0].note or "no reason given").strip().splitlines() or ["no reason given"])[0][:300]
        n = len(errs)
        out.append(f"{what}: {n} trial{'s' * (n != 1)} failed with an error that is not out of memory, so it was not "
                   f"searched further: {first}" + ("" if listed else f" (-v lists {'them' if n != 1 else 'it'})"))
    return out


def candidate_space(cfg, device_kind: str, bf16_supported: bool, *, dtype: str | None = None,
                    compile: bool | None = None, checkpointing: list[int] | None = None,
                    loss_impls: list[str] | None = None, compile_measurable: bool = True,
                    compute_capability: tuple[int, int] | None = None, world_size: int = 1,
                    checkpointing_policies: list[str] | None = None) -> Space:
    """The config's choices, widened by the memory levers. `dtype`: None (the config's, 'auto'
    resolved for this device), 'any' (every dtype this device runs), or a comma list.
    `compile_measurable`: False where torch.compile cannot be measured (the budgeted CPU device).
    `world_size` > 1 (torchrun): FSDP2 joins the levers, after the others (parallelism 'auto'),
    or is the only choice (parallelism 'fsdp2'), or is left out ('ddp').
    `checkpointing_policies`: None (selective and full where torch has selective checkpointing,
    else full) or the ones asked for (--checkpointing-policy).
    Raises PlanError for an unknown dtype, bf16 (asked, or the config's) on a card without it,
    --compile where compile cannot be measured, or --checkpointing-policy selective on a torch
    without it."""
    cc_text = ".".join(map(str, compute_capability)) if compute_capability else None
    too_deep = [c for c in (checkpointing or []) if c > cfg.n_layer]
    if too_deep:  # a lever the model cannot take: refused before any trial, never saved in a plan
        raise PlanError(f"--checkpointing {too_deep[0]}: the model has {counted(cfg.n_layer, 'layer')}; activation "
                        f"checkpointing intervals go from 0 (off) to {cfg.n_layer}")
    dtypes, dropped = dtype_space(cfg, device_kind, bf16_supported, dtype, cc_text)
    compiles = [compile] if compile is not None else ([False, True] if cfg.compile else [False])
    if not compile_measurable:
        # Dynamo compiles nothing while the budgeted CPU device's dispatch-mode tracker is
        # active (torch 2.13), so a compiled trial there would silently measure eager code.
        if compile:
            raise PlanError("--compile: torch.compile cannot be measured on the budgeted CPU device "
                            "(its memory tracker keeps Dynamo from compiling); probe on a GPU, or use --gpu NAME")
        compiles = [False]
    sharded = [False]
    if world_size > 1:
        sharded = {"auto": [False, True], "ddp": [False], "fsdp2": [True]}[cfg.parallelism]
    ck = checkpointing if checkpointing is not None else sorted({cfg.checkpointing, 0, 1})
    policies, notes = checkpointing_policy_space(ck, checkpointing_policies)
    notes = dropped + notes
    if True in sharded and cfg.optimizer == "muon":  # Muon orthogonalises whole matrices; FSDP2 would shard them
        # ('fsdp2' with muon is refused when the config is built: only 'auto' gets here)
        sharded = [False]
        notes.append("FSDP2 not searched: optimizer 'muon' orthogonalises whole matrices and FSDP2 shards them; "
                     "the ranks train with DDP")
    return Space(dtypes=dtypes, compile=compiles, checkpointing=ck, loss_impls=loss_impls or ["standard", "chunked"],
                 sharded=sharded, checkpointing_policies=policies, notes=notes)


def dtype_space(cfg, device_kind: str, bf16_supported: bool, dtype: str | None,
                cc_text: str | None) -> tuple[list[str], list[str]]:
    """(dtypes to search, notes on what a --dtype list asked that this device cannot run): see
    candidate_space's `dtype`. Raises PlanError for an unknown dtype or bf16 alone on a card without it."""
    dropped: list[str] = []
    if dtype is None:
        dtypes = [cfg.resolved_dtype(device_kind, bf16_supported)]
        if dtypes == ["bfloat16"] and not bf16_supported:  # the config's own dtype: the same answer as --dtype
            raise PlanError(bf16_refusal(cc_text) + "; or probe with --dtype float16")
    elif dtype == "any":
        dtypes = ["bfloat16", "float16", "float32"] if device_kind != "cpu" else ["float32", "bfloat16"]
        if not bf16_supported:
            dtypes.remove("bfloat16")
    else:
        dtypes = list(dict.fromkeys(d.strip() for d in dtype.split(",")))  # once each, in order
        for d in dtypes:
            if d == "any":  # 'any' is the whole list, not one of a list
                raise PlanError(f"--dtype {dtype}: 'any' stands alone (every dtype this device runs); "
                                f"a list names dtypes: float32, bfloat16, float16")
            if d not in ("float32", "bfloat16", "float16"):
                raise PlanError(f"--dtype: unknown dtype {d!r} (float32, bfloat16, float16, any)"
                                f"{did_you_mean(d, ['float32', 'bfloat16', 'float16'])}")
            if d == "bfloat16" and not bf16_supported and len(dtypes) == 1:  # the flag's words (t8's M3)
                raise PlanError(f"--dtype bfloat16: {no_bf16_words(cc_text)}; use --dtype float16 (the same memory, "
                                f"with a GradScaler) or --dtype any")
        if "bfloat16" in dtypes and not bf16_supported:  # a list: search the others (t7's L17), said in -v
            dtypes.remove("bfloat16")
            dropped.append(f"bfloat16 not searched: {no_bf16_words(cc_text)}")
    return dtypes, dropped


def checkpointing_policy_space(checkpointing: list[int], asked: list[str] | None) -> tuple[list[str], list[str]]:
    """(policies to search, notes on what is left out and why). Selective checkpointing is searched
    where torch has create_selective_checkpoint_contexts and checkpointing is searched at all;
    selective first, as the one that recomputes less. Raises PlanError for an unknown policy, or
    selective asked on a torch without it."""
    from trainer.model.layers import has_selective_checkpointing
    for p in asked or []:
        if p not in ("full", "selective"):
            raise PlanError(f"--checkpointing-policy: unknown policy {p!r} (full, selective)"
                            f"{did_you_mean(p, ['full', 'selective'])}")
    import torch
    no_sac = (f"torch {torch.__version__} has no torch.utils.checkpoint.create_selective_checkpoint_contexts "
              f"(torch >= 2.4)")
    if asked and "selective" in asked and not has_selective_checkpointing():
        raise PlanError(f"--checkpointing-policy selective: {no_sac}; use full")
    policies = [p for p in ("selective", "full") if p in (asked or ("selective", "full"))]
    why = None
    if "selective" not in policies:
        why = "--checkpointing-policy full"
    elif not has_selective_checkpointing():
        policies, why = ["full"], no_sac
    # (--checkpointing 0: no note; 'selective not searched: checkpointing is not searched' only
    # repeated what the user typed, t7's L15)
    return policies, ([f"selective activation checkpointing not searched: {why}"] if why else [])


def ckpt_words(t) -> str:
    """A candidate's (or record's) checkpointing in a log line: '0', '1', '1 (selective)'."""
    return f"{t.checkpointing}" + (" (selective)" if t.checkpointing and t.checkpointing_policy == "selective" else "")


def lever_combos(space: Space) -> list[Levers]:
    """Every lever combination, cheapest first within a dtype: no recompute, standard loss;
    selective before full recomputation; sharding (FSDP2) last of all, as the lever that costs
    communication. Without checkpointing the policy is always 'full' (nothing is recomputed)."""
    return [Levers(dt, ck, li, sh, pol) for sh in sorted(space.sharded) for dt in space.dtypes
            for ck in sorted(space.checkpointing) for pol in (space.checkpointing_policies if ck else ["full"])
            for li in space.loss_impls]
