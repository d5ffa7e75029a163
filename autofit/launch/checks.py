"""What a run refuses before any probe, model or device work, in one line each: no step left to
train (or only steps at learning rate 0), data that cannot feed the model, and a saved plan that
is not for this run."""
from __future__ import annotations


def check_steps_left(step: int, cfg, max_steps: int | None, resuming: bool = False) -> None:
    """Before any probe or model: a run that would train no step (a fresh run with --max-steps 0
    or max_iters 0; a resume whose checkpoint is already at max_iters or --max-steps) is one line,
    not a probe and a rewritten checkpoint. `step`: the optimizer step the run would start at.
    eval_only runs train nothing by design and pass. Raises TrainError."""
    from trainer.errors import TrainError
    from trainer.schedule import at_zero_lr_from, zero_lr_words
    if cfg.eval_only:
        return
    stop = cfg.max_iters if max_steps is None else min(cfg.max_iters, max_steps)
    if stop > step:
        if at_zero_lr_from(step, cfg):  # every step left would change nothing (some only: say_config_notes)
            raise TrainError(f"nothing to train: every step from {step} on has learning rate 0 ({zero_lr_words(cfg)}); "
                             f"raise lr_decay_iters (--set lr_decay_iters=N{' --allow-changes' * resuming}) or min_lr, "
                             f"or --set eval_only=True to evaluate")
        return
    limit = f"--max-steps {max_steps}" if max_steps is not None and max_steps <= cfg.max_iters \
        else f"max_iters {cfg.max_iters}"
    fix = "--max-steps N" if limit.startswith("--") else "--set max_iters=N"
    where = f"the checkpoint is at step {step}" if resuming else "a new run starts at step 0"
    raise TrainError(f"nothing to train: {where}, and {limit} is not beyond it; raise it ({fix}), "
                     f"or --set eval_only=True to evaluate without training")


def say_config_notes(cfg, max_steps: int | None, log, resumed_at: int | None = None) -> None:
    """One line each, before any probe (where a user reads the config's notes, not after the
    trials' lines): --max-steps past the config's max_iters (the run stops at max_iters, where
    nanoGPT's schedule ends, not at --max-steps); steps at learning rate 0 (_zero_lr_note);
    eval_interval or eval_iters 0, which turn
    evaluation off (nanoGPT divides by the one and averages over the other: t7's M11 saw it pass
    in silence); Muon with weight decay (its rate, 30x AdamW's, decays the matrices fast: r5). Nothing for
    eval_only, which trains no step. `resumed_at`: the step a resume starts at (None: a new run)."""
    if cfg.eval_only:
        return
    if max_steps is not None and max_steps > cfg.max_iters:
        log(f"--max-steps {max_steps} is past max_iters {cfg.max_iters}: the run stops at max_iters (raise it with "
            f"--set max_iters=N to train longer)")
    if note := _zero_lr_note(cfg, max_steps, resumed_at):
        log(note)
    if cfg.optimizer == "muon" and cfg.weight_decay > 0:  # r5: a GPT-2 config's 0.1, 30x AdamW's decay, unsaid
        log(f"note: weight_decay {cfg.weight_decay:g} ({cfg.source_of('weight_decay')}) applies to Muon's matrices at "
            f"muon_lr {cfg.muon_lr:g}: each step shrinks them by {cfg.muon_lr * cfg.weight_decay:.2%} (lr x "
            f"weight_decay, torch.optim.Muon), {cfg.muon_lr / cfg.learning_rate:.0f}x AdamW's at learning_rate "
            f"{cfg.learning_rate:g}; the nanochat-d12 preset sets 0")
    off = [f"{k} 0 ({cfg.source_of(k)})" for k in ("eval_interval", "eval_iters") if getattr(cfg, k) == 0]
    if off:
        log(f"note: {' and '.join(off)}: evaluation is off, so no val loss is measured and ckpt.pt is written at "
            f"stops and at the end" + (" (always_save_checkpoint=False has no best to keep)"
                                       if not cfg.always_save_checkpoint else ""))


def _zero_lr_note(cfg, max_steps: int | None, resumed_at: int | None) -> str | None:
    """The steps of this run that train at learning rate 0 (trainer.schedule.first_zero_lr_step),
    said before training, or None: min_lr 0 with max_iters past lr_decay_iters trains its last steps
    at 0, which nanoGPT allows and autofit allows too, but they change no weight (t11's M3: half a
    run did nothing, unsaid, while a resume into the same steps is refused: check_steps_left)."""
    from trainer.schedule import first_zero_lr_step, zero_lr_words
    start = resumed_at or 0
    end = cfg.max_iters if max_steps is None else min(cfg.max_iters, max_steps)  # steps start .. end - 1 run
    first = first_zero_lr_step(cfg)
    if first is None or not start < first < end:  # from the first step on: check_steps_left refuses it
        return None
    n = end - first
    which = f"step {first}" if n == 1 else f"steps {first:,} to {end - 1:,}"
    set_by = ", ".join(f"{k} {getattr(cfg, k):g} from {cfg.source_of(k).replace('default', 'the default')}"
                       for k in ("min_lr", "lr_decay_iters", "warmup_iters", "max_iters")
                       if k != "warmup_iters" or cfg.warmup_iters > cfg.lr_decay_iters)  # what zero_lr_words names
    return (f"note: {n:,} step{'s' * (n != 1)} of this run's {end - start:,} ({which}) train at learning rate 0 and "
            f"change no weight: {zero_lr_words(cfg)} ({set_by}); raise lr_decay_iters (to max_iters: --set lr_decay_"
            f"iters={cfg.max_iters}{' --allow-changes' if resumed_at is not None else ''}) or min_lr to train them")


def check_data(cfg, vocab_fixed_by: str = "", trained_on: dict | None = None, allow_changes: bool = False,
               log=lambda s: None) -> str | None:
    """Before any probe: the dataset exists, every token id fits cfg.vocab_size, each split
    holds one sequence, and a fresh init_from = 'gpt2*' run's weights are here (or downloaded). `vocab_fixed_by`: the checkpoint whose model fixes vocab_size (a resume),
    so that the advice is one a next attempt can follow. `trained_on`: the checkpoint's data
    fingerprint (trainer.data.tokenfiles.fingerprint per split), where a resume of the same dataset
    name finds data prepared again refused unless allow_changes (then said in `log`): its batches
    and, for characters, its token ids would not be the run's. Returns the accepted change in words
    (for the run's recorded changes), else None. Raises DataError (one line)."""
    from trainer.data.datasets import DATA_ROOT, EMBEDDED, check_embedded_name, load_dataset
    from trainer.data.tokenfiles import DataError, fingerprint, fingerprint_change
    if vocab_fixed_by and cfg.dataset == EMBEDDED:  # a resume on the built-in corpus: its own advice
        check_embedded_name(DATA_ROOT, resumed=vocab_fixed_by)
    data = load_dataset(cfg.dataset)
    change = trained_on and fingerprint_change(trained_on, {s: fingerprint(data.split(s).parts) for s in data.splits})
    if change and not allow_changes:
        raise DataError(f"dataset '{cfg.dataset}' is not the data {vocab_fixed_by} trained on ({change}): it was "
                        f"prepared again since; resume on the data it was trained on, start a new run with another "
                        f"--out, or pass --allow-changes to go on with this data")
    if change:
        log(f"--resume with --allow-changes: dataset '{cfg.dataset}' is not the data it trained on ({change})")
    fix = (f"{vocab_fixed_by}'s model has vocab_size {cfg.vocab_size}, which a resume cannot change: resume it "
           f"on the data it was trained on, or start a new run with another --out") if vocab_fixed_by else ""
    data.check_vocab(cfg.vocab_size, fix)
    if not vocab_fixed_by and data.vocab_source.endswith("meta.pkl") and cfg.vocab_size > data.vocab_size:
        # a vocab_size set by hand above the characters (a config written for another text): it
        # trains, but nanoGPT would take meta.pkl's, and the ids past it are never seen
        log(f"note: vocab_size {cfg.vocab_size} ({cfg.source_of('vocab_size')}) is above the {data.vocab_size} "
            f"characters {data.vocab_source} declares: ids {data.vocab_size} to {cfg.vocab_size - 1} never occur "
            f"({_vocab_advice(cfg, data.vocab_size)})")
    data.check_block_size(cfg.block_size)
    if cfg.init_from.startswith("gpt2") and not vocab_fixed_by:  # a fresh fine-tune: its weights, before trials
        from trainer.model.pretrained import locate_gpt2
        locate_gpt2(cfg.init_from)  # WeightsError: one line (offline and not cached, no such model)
    return f"dataset '{cfg.dataset}' prepared again ({change})" if change else None


def _vocab_advice(cfg, characters: int) -> str:
    """What a user can do about a vocab_size above meta.pkl's, by where the value came from."""
    src = cfg.source_of("vocab_size")
    if cfg.init_from.startswith("gpt2"):
        return (f"{cfg.init_from}'s weights fix vocab_size; they learned GPT-2's BPE tokens, and this dataset's ids "
                f"are characters")
    if src.startswith("preset "):
        return f"{src} fixes it; --set vocab_size={characters} to take meta.pkl's"
    return "drop vocab_size from the config to take meta.pkl's, as nanoGPT does"


def check_saved_plan(plan, cfg, world_size: int, profile: str, fp: str) -> None:
    """A saved plan (autofit.records.PlanRecord) found by its fingerprint is for this run: its
    ranks, each rank's effective batch and block size are those of `cfg` (its largest stage where
    it has stages) on `world_size` ranks. The fingerprint holds the config, so a plan that says
    otherwise was edited by hand; run as it is, it would train another batch or print ranks that
    do not exist. Raises ProfileError naming it and how to clear it."""
    from autofit.profiles.files import ProfileError
    from trainer.config.stages import fitted_config
    fitted = fitted_config(cfg)
    want = {"world_size": world_size, "effective_batch": fitted.effective_batch // world_size,
            "block_size": fitted.block_size}
    wrong = [f"{k} {getattr(plan, k)} (this run: {v})" for k, v in want.items() if getattr(plan, k) != v]
    if (plan.world_size == 1) != (plan.parallelism == "single"):
        wrong.append(f"parallelism {plan.parallelism!r} on {plan.world_size} rank{'s' * (plan.world_size != 1)}")
    if wrong:
        raise ProfileError(f"profile {profile}'s plan {fp} does not describe this run ({'; '.join(wrong)}): was it "
                           f"edited by hand? clear it with: autofit profiles rm {profile} --plan {fp}")
