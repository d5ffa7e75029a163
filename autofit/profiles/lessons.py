"""Lessons runs teach a saved plan (a safe micro-batch after a run-time OOM, compile off after
compile ran out of memory): when and where each was learnt, how a fresh probe clears the ones from
before it, how a user clears them by hand, and how a run reusing the plan says them.

A lesson can be wrong for good: an OOM may be transient (another process on the GPU for a while,
a fragmented allocator late in a long run). So each is dated, a probe started after it measures
again and wins, and `autofit profiles rm NAME --plan FP --lessons` clears them.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# store.FittedPlan, which holds Lessons (store imports this module, so not the other way round)
FittedPlan = Any


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _as_utc(value: datetime) -> datetime:
    # Naive datetimes would compare badly with aware ones read back from disk; treat them as UTC.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Lesson(BaseModel):
    """When and where a run learnt a lesson (a safe micro-batch, compile off): a probe started
    after it measures again and clears it (save_plan)."""
    model_config = ConfigDict(extra="forbid")

    learned: datetime  # UTC
    step: int | None = Field(default=None, ge=0)  # the optimizer step it happened at
    failed_micro_batch: int | None = Field(default=None, ge=1)  # the size that ran out of memory
    run: str = ""  # the run's --out folder

    @field_validator("learned")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _as_utc(value)

    def words(self) -> str:
        """'step 3 of run out/, micro-batch 8 ran out of memory, 2026-12-05 20:13 UTC'."""
        where = [f"step {self.step}" + (f" of run {self.run}" if self.run else "") if self.step is not None
                 else (f"run {self.run}" if self.run else ""),
                 f"micro-batch {self.failed_micro_batch} ran out of memory" if self.failed_micro_batch else "",
                 f"{self.learned:%Y-%m-%d %H:%M} UTC"]
        return ", ".join(w for w in where if w)


def merged(old: FittedPlan, new: FittedPlan, since: datetime | None) -> tuple[dict[str, Any], list[str]]:
    """(the fields a plan saved again keeps of `old`: its created, its events (one more saying
    which lessons the probe cleared), and its lessons newer than `since` merged with `new`'s;
    the lessons it cleared, in words, for the probe to say them)."""
    def fresh(value, lesson: Lesson | None) -> bool:
        return bool(value) and (since is None or (lesson is not None and lesson.learned >= _as_utc(since)))
    cleared = []
    safe, safe_lesson = new.safe_micro_batch, new.safe_micro_batch_lesson
    if fresh(old.safe_micro_batch, old.safe_micro_batch_lesson):
        if safe is None or old.safe_micro_batch <= safe:
            safe, safe_lesson = old.safe_micro_batch, old.safe_micro_batch_lesson
    elif old.safe_micro_batch:
        cleared.append(_safe_words(old))
    failed, failed_lesson = new.compile_failed, new.compile_failed_lesson
    if fresh(old.compile_failed, old.compile_failed_lesson) and not failed:
        failed, failed_lesson = True, old.compile_failed_lesson
    elif old.compile_failed and not fresh(old.compile_failed, old.compile_failed_lesson):
        cleared.append(_compile_words(old))
    events = old.events + [e for e in new.events if e not in old.events]
    if cleared:
        events.append(f"{_now():%Y-%m-%dT%H:%MZ} probed again, lessons from before the probe cleared: "
                      f"{'; '.join(cleared)}")
    return {"created": old.created, "events": events, "safe_micro_batch": safe, "safe_micro_batch_lesson": safe_lesson,
            "compile_failed": failed, "compile_failed_lesson": failed_lesson}, cleared


def _learned(lesson: Lesson | None) -> str:
    return lesson.words() if lesson is not None else "learnt at an unknown time, by an autofit before lessons were dated"


def _safe_words(plan: FittedPlan) -> str:
    return f"safe micro-batch {plan.safe_micro_batch} ({_learned(plan.safe_micro_batch_lesson)})"


def _compile_words(plan: FittedPlan) -> str:
    return f"compile off ({_learned(plan.compile_failed_lesson)})"


def clear_lessons(plan: FittedPlan) -> list[str]:
    """Clears `plan`'s lessons (safe micro-batch, compile off) in place; returns what was cleared,
    in words ('safe micro-batch 1 (step 3 of run out, ...)'), empty if there was none."""
    cleared = []
    if plan.safe_micro_batch:
        cleared.append(_safe_words(plan))
    if plan.compile_failed:
        cleared.append(_compile_words(plan))
    plan.safe_micro_batch, plan.safe_micro_batch_lesson = None, None
    plan.compile_failed, plan.compile_failed_lesson = False, None
    if cleared:
        plan.events.append(f"{_now():%Y-%m-%dT%H:%MZ} lessons cleared by hand: {'; '.join(cleared)}")
    return cleared


def lesson_notes(fitted: FittedPlan, micro_batch: int, compiled: bool, profile: str) -> list[str]:
    """The notes of a run that reuses `fitted` (its plan's `micro_batch`, `compiled`) where
    lessons change it, each with when and where it was learnt and how to clear it (a transient
    OOM must not shrink every later run without a way out)."""
    clear = f"clear with: autofit profiles rm {profile} --plan {fitted.fingerprint} --lessons"
    notes = []
    if fitted.safe_micro_batch and fitted.safe_micro_batch < micro_batch:
        notes.append(f"micro-batch lowered to {fitted.safe_micro_batch} by an earlier run-time OOM "
                     f"({_learned(fitted.safe_micro_batch_lesson)}; {clear})")
    if fitted.compile_failed and compiled:
        notes.append(f"compile off: it ran out of memory in an earlier run ({_learned(fitted.compile_failed_lesson)}; "
                     f"{clear})")
    return notes
