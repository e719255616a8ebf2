"""When a schedule fires: its slots in UTC, from a cron expression in an IANA time zone
or a fixed interval. Pure: the caller passes `now`.

Time zones are zoneinfo's and cron arithmetic is croniter's (tz-aware, so a daily
09:00 stays 09:00 local across DST). One rule is ours, the one cron itself follows: on
the night clocks go back, a job pinned to particular hours fires once, at the first
of the two identical wall-clock times; jobs that run every hour keep running through
both.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from backend.workflows.graph import ScheduleTrigger

# Bound on the slots looked at in one go (a minute-cron after a week of downtime).
MAX_SLOTS = 1000


def _repeated_wall_time(slot: datetime, tz: ZoneInfo) -> bool:
    """The second occurrence of a wall-clock time that happens twice (clocks went back)."""
    # Converting from UTC sets `fold` on the second occurrence (PEP 495).
    local = slot.astimezone(UTC).astimezone(tz)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _every_hour(cron: str) -> bool:
    return cron.split()[1] in ("*", "*/1")


def slots_after(config: ScheduleTrigger, after: datetime) -> Iterator[datetime]:
    """Fire times strictly after `after`, in UTC, in order (endless)."""
    if config.interval_s is not None:
        step = timedelta(seconds=config.interval_s)
        current = after
        while True:
            current = current + step
            yield current
    assert config.cron is not None
    tz = ZoneInfo(config.timezone)
    it = croniter(config.cron, after.astimezone(tz))
    pinned = not _every_hour(config.cron)
    while True:
        slot = it.get_next(datetime).astimezone(UTC)
        if pinned and _repeated_wall_time(slot, tz):
            continue
        yield slot


def first_slot(config: ScheduleTrigger, now: datetime) -> datetime:
    """The next fire time of a schedule that starts (or restarts) now."""
    return next(slots_after(config, now))


def next_times(config: ScheduleTrigger, now: datetime, count: int) -> list[datetime]:
    out: list[datetime] = []
    for slot in slots_after(config, now):
        out.append(slot)
        if len(out) >= count:
            break
    return out


def due(
    config: ScheduleTrigger, next_run_at: datetime, now: datetime, grace: timedelta
) -> tuple[list[datetime], datetime]:
    """(slots to fire now, the next slot after now) for a schedule whose next slot was
    `next_run_at`. Slots older than `grace` were missed (beat was down): `skip` fires
    none of them, `fire_once` fires one, for the latest missed slot."""
    slots: list[datetime] = []
    upcoming = next_run_at
    if next_run_at <= now:
        slots.append(next_run_at)
        for slot in slots_after(config, next_run_at):
            if slot > now:
                upcoming = slot
                break
            slots.append(slot)
            if len(slots) >= MAX_SLOTS:
                # Far behind: forget the rest of the backlog, start again from now.
                upcoming = first_slot(config, now)
                break
    on_time = [s for s in slots if now - s <= grace]
    missed = [s for s in slots if now - s > grace]
    fire = on_time
    if missed and config.misfire == "fire_once":
        fire = [missed[-1], *on_time]
    return fire, upcoming
