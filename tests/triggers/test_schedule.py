"""Schedule arithmetic (pure): cron in a time zone, intervals, DST, misfire policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from backend.triggers.schedule import due, next_times
from backend.workflows.graph import ScheduleTrigger

GRACE = timedelta(seconds=60)


def cfg(**fields: Any) -> ScheduleTrigger:
    return ScheduleTrigger.model_validate({"kind": "schedule", **fields})


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_cron_in_a_time_zone_fires_at_local_wall_time() -> None:
    paris = cfg(cron="0 9 * * *", timezone="Europe/Paris")
    # Winter: UTC+1; the night of 29 March 2026 Paris moves to UTC+2.
    assert next_times(paris, utc(2026, 3, 27, 12), 3) == [
        utc(2026, 3, 28, 8),
        utc(2026, 3, 29, 7),
        utc(2026, 3, 30, 7),
    ]


def test_spring_forward_a_skipped_wall_time_fires_once_just_after() -> None:
    ny = cfg(cron="30 2 * * *", timezone="America/New_York")
    # 8 March 2026: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist that day.
    assert next_times(ny, utc(2026, 3, 7, 12), 3) == [
        utc(2026, 3, 8, 7),  # 03:00 EDT
        utc(2026, 3, 9, 6, 30),
        utc(2026, 3, 10, 6, 30),
    ]


def test_fall_back_a_pinned_wall_time_fires_once_not_twice() -> None:
    ny = cfg(cron="30 1 * * *", timezone="America/New_York")
    # 1 November 2026: 01:30 happens twice (EDT, then EST); cron fires the first only.
    assert next_times(ny, utc(2026, 10, 31, 12), 3) == [
        utc(2026, 11, 1, 5, 30),
        utc(2026, 11, 2, 6, 30),
        utc(2026, 11, 3, 6, 30),
    ]


def test_fall_back_an_every_half_hour_job_keeps_running_through_both_hours() -> None:
    ny = cfg(cron="*/30 * * * *", timezone="America/New_York")
    slots = next_times(ny, utc(2026, 11, 1, 4, 50), 6)
    assert slots == [utc(2026, 11, 1, 5) + timedelta(minutes=30 * i) for i in range(6)]


def test_interval_schedules_step_from_the_last_slot() -> None:
    every = cfg(interval_s=300)
    assert next_times(every, utc(2026, 1, 1), 2) == [utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 10)]


def test_a_schedule_needs_exactly_one_of_cron_and_interval() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        cfg()
    with pytest.raises(ValueError, match="exactly one"):
        cfg(cron="* * * * *", interval_s=60)
    with pytest.raises(ValueError, match="time zone"):
        cfg(cron="* * * * *", timezone="Mars/Olympus")


def test_on_time_slots_fire_and_the_next_slot_follows_now() -> None:
    every_minute = cfg(cron="* * * * *")
    fire, upcoming = due(every_minute, utc(2026, 1, 1, 10, 0), utc(2026, 1, 1, 10, 0, 20), GRACE)
    assert fire == [utc(2026, 1, 1, 10, 0)]
    assert upcoming == utc(2026, 1, 1, 10, 1)


def test_misfire_skip_drops_slots_missed_while_beat_was_down() -> None:
    hourly = cfg(cron="0 * * * *", misfire="skip")
    # Beat was down from 10:00 to 13:00:30: slots 10, 11, 12 are missed, 13:00 is on time.
    fire, upcoming = due(hourly, utc(2026, 1, 1, 10), utc(2026, 1, 1, 13, 0, 30), GRACE)
    assert fire == [utc(2026, 1, 1, 13)]
    assert upcoming == utc(2026, 1, 1, 14)
    fire, _ = due(hourly, utc(2026, 1, 1, 10), utc(2026, 1, 1, 12, 30), GRACE)
    assert fire == []


def test_misfire_fire_once_runs_one_catch_up_for_all_missed_slots() -> None:
    hourly = cfg(cron="0 * * * *", misfire="fire_once")
    fire, upcoming = due(hourly, utc(2026, 1, 1, 10), utc(2026, 1, 1, 12, 30), GRACE)
    assert fire == [utc(2026, 1, 1, 12)]
    assert upcoming == utc(2026, 1, 1, 13)
