"""When the scheduler plans and when a step's results are applied: the trace overlap checks read."""
from __future__ import annotations


def record_plan_events(scheduler) -> list[str]:
    """Wrap ``scheduler.schedule`` and ``scheduler.update`` (on this instance) to record each call.

    Returns the list they append to: ``"S"`` for a plan made, ``"U"`` for a step's results
    applied. In ``"".join(events)``, ``"SS"`` is a plan made while the previous step was still
    in flight (its results not yet applied), which only overlap does.
    """
    events: list[str] = []
    schedule, update = scheduler.schedule, scheduler.update
    scheduler.schedule = lambda: (events.append("S"), schedule())[1]
    scheduler.update = lambda out, res: (events.append("U"), update(out, res))[1]
    return events
