"""Admission under overload: while the door refuses calls and the machine has no CPU to
spare, admit fewer of them.

The door (`server.CallSlots`, the batcher's `refusal`) refuses a call before its payload is
read, yet each refusal still costs gRPC about 0.6-0.7 ms of CPU. At 10x overload on a small
machine, serving the admitted calls leaves too little CPU for refusing the rest. The calls
then wait unseen inside gRPC, before the door, for seconds, admitted and refused alike. Serving
fewer calls gives that CPU back. On the 2-core VM of bench/RESULTS.md ("Overload and hostile
input"), a fixed cap of a third of the sustained rate kept every call's wait before the door
under 10 ms while about 15 % of the CPU stayed idle. With no cap, idle fell to 2-6 % and the
wait grew by a second every second. The intake event loop's own lag stayed under 15 ms
throughout, so it is not the signal. The share of idle CPU is.

Where the cliff lies depends on the machine, so the cap is found as it goes, by
multiplicative steps on that signal (smoothed):

    overloaded    more than `overload` calls are refused for each call served (half: more
                  than 1.5 times what is served is offered), counting those the queue refused
                  just after the door let them in and those the door refused for want of a
                  free slot, and more than `min_refused_per_s` a second: fewer cost too little
                  CPU to matter (200 a second take about 0.12 of a core), and a few callers
                  that retry after the pushback (a closed loop of 8, refused 50-80 times a
                  second where large experts saturate the CPU) stay under it. Once engaged,
                  more than `hold_refused_per_s` keeps it so: at 3x, a cap grown to a quarter
                  of the calls leaves fewer than 200 a second to refuse, and lifting it there
                  let the backlog back in
    squeezed      idle CPU under `min_idle`, and this process (the router) using at least
                  `min_busy_cores`. Serving less frees CPU for the intake only when the router
                  is what is busy. Where the experts saturate the CPU (the router at 0.4-0.7
                  of a core in bench/overload.py with I=2048, against 0.8-1.0 at I=128) the
                  refusals already come back within milliseconds, and a cap would only cost
                  throughput.
    engaged       from the first tick both hold: at most `cap` calls are admitted a second (a
                  token bucket). The cap starts at its floor, `floor` times the rate served
                  before the overload (`served_per_s`: the admitted rate, smoothed over
                  `served_smoothing_s` while not overloaded), so that the calls already
                  waiting before the door are refused soon; the rate admitted during the
                  overload is no base, as those calls arrive in bursts. Each time both hold
                  again, at most once per `hold_s`, the cap is multiplied by `decrease`. While
                  idle is over `spare_idle` and the cap is what refuses, it grows by
                  `increase` of itself a second. In between it holds.
    lifted        no cap once the door has not been overloaded for `quiet_s`: the usual state

The floor is for callers that retry at once when refused. Against them no cap frees CPU (each
cap refusal brings another call), and without a floor it would fall to nothing.

A caller refused by the cap is told to retry after one token's time (1 / cap).

Runs on the intake's thread: `refusal` at the door, `tick` from the intake's timer. Plain
Python with an injected clock and CPU readings: knows nothing of gRPC, Ray or torch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from moefleet.core.errors import Overloaded

__all__ = ["Admission", "AdmissionPolicy", "CpuIdle", "ProcessCpu"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdmissionPolicy:
    min_idle: float  # idle CPU share under this, while overloaded: admit fewer calls
    spare_idle: float = 0.2  # idle CPU share over this: let the cap grow
    decrease: float = 0.4  # the cap is multiplied by this on each decrease
    increase: float = 0.3  # while idle is over spare_idle, the cap grows by this fraction a second
    hold_s: float = 0.3  # the least time between two decreases: the backlog takes a while to go
    quiet_s: float = 2.0  # this long not overloaded, the cap is lifted
    # The smoothing is short, as the cap's onset waits on it: at 10x the calls that wait before
    # the door can grow by up to 40 a tick until it engages (bench/RESULTS.md, "Overload ...").
    idle_smoothing_s: float = 0.03  # the time constant of the idle share's smoothing
    busy_smoothing_s: float = 0.05  # ... and of the busy cores'
    overload: float = 0.5  # overloaded: refusing more than this many calls a second per call admitted
    min_refused_per_s: float = 200.0  # ... and more than this many: fewer cost too little CPU to matter
    hold_refused_per_s: float = 50.0  # ... or, while the cap is engaged, this many
    min_busy_cores: float = 0.7  # the cap engages only while this process uses this many cores
    floor: float = 0.15  # the cap never goes under this share of served_per_s
    rate_smoothing_s: float = 0.03  # the time constant of the admitted and refused rates' smoothing
    served_smoothing_s: float = 5.0  # ... and of the rate served while not overloaded
    burst_s: float = 0.1  # the bucket holds this many seconds of the cap (at least one call)


class CpuIdle:
    """The share of the machine's CPU time spent idle since the last call, from /proc/stat;
    None where that file cannot be read (not Linux) or no time has passed."""

    def __init__(self, path: str = "/proc/stat"):
        self._path = path
        self._last = self._read()

    def __call__(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return (now[0] - last[0]) / (now[1] - last[1])

    def _read(self) -> tuple[int, int] | None:
        """(idle and iowait jiffies, all jiffies) of every CPU together."""
        try:
            with open(self._path) as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (fields[3] + fields[4], sum(fields)) if len(fields) >= 5 else None


class ProcessCpu:
    """The cores this process used since the last call (all its threads together)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._last = (time.process_time(), clock())

    def __call__(self) -> float | None:
        now = (time.process_time(), self._clock())
        last, self._last = self._last, now
        return (now[0] - last[0]) / (now[1] - last[1]) if now[1] > last[1] else None


class Admission:
    """The door's last check: the queue's own `check`, then, while engaged, the cap."""

    def __init__(self, check: Callable[[int], Overloaded | None], policy: AdmissionPolicy,
                 idle: Callable[[], float | None] | None = None,
                 busy: Callable[[], float | None] | None = None,
                 refused_later: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.monotonic):
        """check: the door's refusal without the cap (the batcher's `refusal`); idle: the
        CPU's idle share since the last call (default `CpuIdle()`); busy: the cores this
        process used since the last call (default `ProcessCpu()`); refused_later: how many
        calls the door let in were refused after it so far (the batcher's `refused`: its
        check at the door cannot see the calls between the door and its queue)."""
        self._check, self.policy, self._clock = check, policy, clock
        self._refused_later, self._later_seen = refused_later, refused_later()
        self._idle = CpuIdle() if idle is None else idle
        self._busy = ProcessCpu(clock) if busy is None else busy
        self.cap = math.inf  # calls/s admitted while engaged
        self.idle, self.busy = 1.0, 0.0  # smoothed
        self.admitted_per_s = self.refused_per_s = self.served_per_s = 0.0  # smoothed
        self.refused_by_cap = 0  # a count, for `Router.admission()`
        self._tokens = 0.0
        self._filled_at = clock()
        self._overloaded_at = self._capped_at = self._decreased_at = -math.inf
        self._ticked_at = clock()
        self._admitted = self._refused = 0  # calls since the last tick

    @property
    def engaged(self) -> bool:
        return math.isfinite(self.cap)

    def refusal(self, open_calls: int = 0) -> Overloaded | None:
        """Why a call arriving now, with `open_calls` open, is refused, or None (it is admitted
        and counted)."""
        now = self._clock()
        refusal = self._check(open_calls)
        if refusal is None and self.engaged:
            refusal = self._take(now)
        if refusal is not None:
            self._refused += 1
            return refusal
        self._admitted += 1
        return None

    def refused_elsewhere(self) -> None:
        """Count a call the door refused before asking `refusal` (all its slots taken)."""
        self._refused += 1

    def tick(self) -> None:
        """Read the CPU, then move the cap. Called every few tens of milliseconds."""
        now, idle, busy = self._clock(), self._idle(), self._busy()
        dt, self._ticked_at = now - self._ticked_at, now
        if dt <= 0:
            return
        total = self._refused_later()
        later, self._later_seen = total - self._later_seen, total
        self._admitted, self._refused = max(self._admitted - later, 0), self._refused + later
        p = self.policy
        self.admitted_per_s = _toward(self.admitted_per_s, self._admitted / dt, dt, p.rate_smoothing_s)
        self.refused_per_s = _toward(self.refused_per_s, self._refused / dt, dt, p.rate_smoothing_s)
        self._admitted = self._refused = 0
        if idle is not None and math.isfinite(idle):
            self.idle = _toward(self.idle, min(max(idle, 0.0), 1.0), dt, p.idle_smoothing_s)
        if busy is not None and math.isfinite(busy):
            self.busy = _toward(self.busy, max(busy, 0.0), dt, p.busy_smoothing_s)
        least = p.hold_refused_per_s if self.engaged else p.min_refused_per_s
        if self.refused_per_s > max(p.overload * self.admitted_per_s, least):
            self._overloaded_at = now
        elif not self.engaged:
            self.served_per_s = _toward(self.served_per_s, self.admitted_per_s, dt, p.served_smoothing_s)
        if now - self._overloaded_at > p.quiet_s:
            if self.engaged:
                log.warning("overload over: the cap on admitted calls is lifted (%d refused by it)",
                            self.refused_by_cap)
            self.cap = math.inf
        elif self.idle < p.min_idle and self.busy >= p.min_busy_cores and now == self._overloaded_at:
            if now - self._decreased_at >= p.hold_s:
                self._set_cap(self.cap * p.decrease if self.engaged else 0.0, now)  # or: its floor
                self._decreased_at = now
        elif self.engaged and self.idle > p.spare_idle and now - self._capped_at <= p.hold_s:
            self._set_cap(self.cap * (1.0 + p.increase * dt), now)

    def _set_cap(self, cap: float, now: float) -> None:
        cap = max(cap, self.policy.floor * self.served_per_s, 1.0)
        if self.engaged:
            self._refill(now)  # at the old cap, up to now
        else:  # a new bucket starts full
            self._tokens, self._filled_at = self._depth(cap), now
            log.warning("overloaded with %.0f%% of the CPU idle: admitting at most %.0f calls/s "
                        "(%.0f/s served before)", self.idle * 100, cap, self.served_per_s)
        self.cap = cap

    def _depth(self, cap: float) -> float:
        return max(1.0, cap * self.policy.burst_s)

    def _refill(self, now: float) -> None:
        self._tokens = min(self._depth(self.cap), self._tokens + (now - self._filled_at) * self.cap)
        self._filled_at = now

    def _take(self, now: float) -> Overloaded | None:
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        self._capped_at = now
        self.refused_by_cap += 1
        return Overloaded(
            f"router is overloaded: with {self.idle:.0%} of the CPU idle it admits at most "
            f"{self.cap:.0f} calls/s for now; retry later", 1.0 / self.cap)


def _toward(old: float, new: float, dt: float, time_constant_s: float) -> float:
    """`old` moved towards `new` by an exponential smoothing step of `dt` seconds."""
    return old + (1.0 - math.exp(-dt / time_constant_s)) * (new - old)
