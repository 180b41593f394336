"""Record what a scheduler hands out: every ``schedule()`` and every lookahead batch."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def recorded_schedules(scheduler):
    """Yields a list that fills with ("schedule" | "ahead", SchedulerOutput) in call order
    (lookahead calls that scheduled nothing are left out); the methods are restored after."""
    seen: list = []
    original, original_ahead = scheduler.schedule, scheduler.schedule_lookahead

    def schedule():
        out = original()
        seen.append(("schedule", out))
        return out

    def schedule_lookahead(running):
        out = original_ahead(running)
        if out is not None:
            seen.append(("ahead", out))
        return out
    scheduler.schedule, scheduler.schedule_lookahead = schedule, schedule_lookahead
    try:
        yield seen
    finally:
        scheduler.schedule, scheduler.schedule_lookahead = original, original_ahead
