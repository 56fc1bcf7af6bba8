"""Refusals from memory: what an API process knows about each user's quota, running jobs and the
scheduler's last "overloaded", so the crowd that is refused costs no database write and, in the
steady state, no read.

Memory only ever refuses what the database would refuse too, give or take `recheck_s`: every entry
comes from a transaction's result or a read and is corrected by the scheduler's updates (a refund, a
job finishing); an entry that would refuse and is older than `recheck_s` is read again first. The
admission transaction still decides every request that memory lets through.

With Redis (`announce` set), each admission's new daily total is announced, so every replica counts
the admissions made through the others (`usage_elsewhere`) and refuses a spent quota from memory too.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.errors import Overloaded, RetryLater
from kiln.service import quota
from kiln.service.job_admission import concurrency_refusal
from kiln.service.messages import JobUpdate
from kiln.service.plans import PlanLimits

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class _Usage:
    day: dt.date
    used: int
    confirmed_at: float


@dataclass
class _Active:
    jobs: set[str] = field(default_factory=set)
    confirmed_at: float = float("-inf")


@dataclass(frozen=True)
class _Verdict:
    until: float
    retry_after_s: float
    message: str


class Refusals:
    def __init__(self, *, recheck_s: float = 2.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.recheck_s = recheck_s
        self._monotonic = monotonic
        self._usage: dict[str, _Usage] = {}
        self._active: dict[str, _Active] = {}
        self._overloaded: dict[tuple[str, str], _Verdict] = {}
        self._refunded: OrderedDict[str, None] = OrderedDict()
        self.announce: Callable[[str, dt.date, int], None] | None = None
        """Tells the other replicas a user's day total after an admission here; None: no one."""

    # ---- what memory says

    def usage(self, user_id: str, plan: PlanLimits, now: dt.datetime) -> quota.Usage | None:
        """Today's usage if memory knows it well enough (confirmed within `recheck_s`), else None."""
        entry = self._usage.get(user_id)
        if entry is None or self._monotonic() - entry.confirmed_at > self.recheck_s:
            return None
        used = entry.used if entry.day == quota.quota_day(now) else 0
        return quota.Usage(plan=plan.name, used=used, limit=plan.images_per_day, resets_at=quota.next_reset(now))

    def active_jobs(self, user_id: str) -> int:
        entry = self._active.get(user_id)
        return 0 if entry is None else len(entry.jobs)

    def stale_usage(self, user_id: str, plan: PlanLimits, n: int, now: dt.datetime) -> bool:
        """Memory would refuse on the quota, but has not confirmed the usage lately."""
        entry = self._usage.get(user_id)
        if entry is None or plan.images_per_day is None or plan.relax_mode:
            return False
        used = entry.used if entry.day == quota.quota_day(now) else 0
        return used + n > plan.images_per_day and self._monotonic() - entry.confirmed_at > self.recheck_s

    def needs_recheck(self, user_id: str, plan: PlanLimits) -> bool:
        """Memory would refuse on the concurrency cap, but has not confirmed it lately."""
        entry = self._active.get(user_id)
        return (entry is not None and len(entry.jobs) >= plan.max_concurrent
                and self._monotonic() - entry.confirmed_at > self.recheck_s)

    def refusal(self, user_id: str, plan: PlanLimits, n: int, now: dt.datetime) -> RetryLater | None:
        """The refusal the admission transaction would give, if memory is sure of it (quota first)."""
        usage = self.usage(user_id, plan, now)
        if usage is not None and usage.limit is not None and usage.used + n > usage.limit and not plan.relax_mode:
            return quota.quota_refusal(usage.limit, now)
        if self.active_jobs(user_id) >= plan.max_concurrent and not self.needs_recheck(user_id, plan):
            return concurrency_refusal(plan)
        verdict = self._overloaded.get((plan.name, user_id))
        if verdict is not None:
            left = verdict.until - self._monotonic()
            if left > 0:
                return Overloaded(verdict.message, retry_after_s=max(1.0, verdict.retry_after_s))
            del self._overloaded[(plan.name, user_id)]
        return None

    # ---- what memory learns

    def confirm_usage(self, user_id: str, day: dt.date, used: int) -> None:
        self._usage[user_id] = _Usage(day, used, self._monotonic())

    def confirm_active(self, user_id: str, job_ids: set[str]) -> None:
        self._active[user_id] = _Active(set(job_ids), self._monotonic())

    def admitted(self, user_id: str, job_id: str, day: dt.date, used: int | None) -> None:
        """A job this process just admitted (`used`: the day's total the transaction returned)."""
        self._active.setdefault(user_id, _Active()).jobs.add(job_id)
        if used is not None:
            self.confirm_usage(user_id, day, used)
            if self.announce is not None:
                self.announce(user_id, day, used)

    def usage_elsewhere(self, user_id: str, day: dt.date, used: int) -> None:
        """Another replica admitted: the day's total its transaction returned."""
        entry = self._usage.get(user_id)
        if entry is not None and entry.day == day and entry.used > used:
            # a later admission here or there counted more already; a refund may since have
            # lowered it, which a read corrects within `recheck_s`
            used = entry.used
        self.confirm_usage(user_id, day, used)

    def forget_usage(self) -> None:
        """Forget every user's usage (a notice may have been missed): read again on next use."""
        self._usage.clear()

    def overloaded(self, plan: str, user_id: str, retry_after_s: float, message: str) -> None:
        """The scheduler refused: the queue cannot drain sooner, so answer the same for a while."""
        hold_s = min(1.0, retry_after_s)
        self._overloaded[(plan, user_id)] = _Verdict(self._monotonic() + hold_s, retry_after_s, message)
        if len(self._overloaded) > 100_000:  # bounded: drop the expired ones
            now = self._monotonic()
            self._overloaded = {k: v for k, v in self._overloaded.items() if v.until > now}

    def ended(self, user_id: str, job_id: str, charge_state: str, units: int) -> None:
        """A job ended (told by the scheduler, or cancelled here): it no longer counts against the
        cap, and a refund is given back to the usage once, however often it is told."""
        entry = self._active.get(user_id)
        if entry is not None:
            entry.jobs.discard(job_id)
            if not entry.jobs:
                del self._active[user_id]
        if charge_state != "refunded" or not units or job_id in self._refunded:
            return
        self._refunded[job_id] = None
        while len(self._refunded) > 100_000:
            self._refunded.popitem(last=False)
        usage = self._usage.get(user_id)
        if usage is not None:
            usage.used = max(0, usage.used - units)

    def on_update(self, update: JobUpdate) -> None:
        """A scheduler update: a job some process admitted is alive, or ended (and maybe refunded)."""
        if update.name in TERMINAL:
            self.ended(update.user_id, update.job_id, update.charge_state, update.charge_units)
        elif update.job_id not in self._refunded:
            self._active.setdefault(update.user_id, _Active()).jobs.add(update.job_id)
