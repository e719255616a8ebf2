"""The schedule dispatcher against PostgreSQL, driven by a clock the test controls."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.config import Settings
from backend.kit.db import UnitOfWork
from backend.models import Trigger, WorkflowExecution
from backend.triggers.service import dispatch_due
from tests.support.factories import make_workflow
from tests.support.identity import make_workspace
from tests.support.triggers import published, with_trigger

T0 = datetime(2026, 1, 5, 9, 0, 30, tzinfo=UTC)


async def tick(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, now: datetime
) -> list[str]:
    async with UnitOfWork(sessionmaker) as uow:
        return [str(i) for i in await dispatch_due(uow, settings, now)]


async def slots_of(session: AsyncSession, workflow_id: object) -> list[datetime]:
    rows = await session.scalars(
        select(WorkflowExecution.scheduled_for)
        .where(WorkflowExecution.workflow_id == workflow_id)
        .order_by(WorkflowExecution.scheduled_for)
    )
    return [r for r in rows.all() if r is not None]


async def test_a_cron_trigger_fires_once_at_each_slot(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    workspace = await make_workspace(session)
    wf = await published(
        session, workspace, with_trigger({"kind": "schedule", "cron": "*/5 * * * *"}), now=T0
    )
    # Ticks every 15 s for 20 minutes of controlled time.
    now = T0
    while now < T0 + timedelta(minutes=20):
        await tick(sessionmaker, settings, now)
        now += timedelta(seconds=15)
    slots = await slots_of(session, wf.id)
    assert slots == [T0.replace(second=0) + timedelta(minutes=5 * i) for i in range(1, 5)]
    run = await session.scalar(
        select(WorkflowExecution).where(WorkflowExecution.workflow_id == wf.id).limit(1)
    )
    assert run is not None
    assert run.trigger_type == "schedule" and run.created_by is None and run.status == "pending"
    assert run.version == wf.current_version
    assert run.trigger_data["scheduled_for"] == slots[0].isoformat()


async def test_a_draft_or_disabled_schedule_does_not_fire(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    workspace = await make_workspace(session)
    definition = with_trigger({"kind": "schedule", "cron": "* * * * *"})
    draft = await make_workflow(session, workspace, definition=definition)
    from backend.triggers import service

    await service.sync(session, draft, definition, now=T0)
    live = await published(session, workspace, definition, now=T0)
    trigger = await session.scalar(select(Trigger).where(Trigger.workflow_id == live.id))
    assert trigger is not None
    trigger.enabled = False
    await session.flush()
    await tick(sessionmaker, settings, T0 + timedelta(minutes=3))
    assert await slots_of(session, draft.id) == []
    assert await slots_of(session, live.id) == []


async def test_a_slot_that_was_already_fired_is_never_fired_again(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    workspace = await make_workspace(session)
    wf = await published(
        session, workspace, with_trigger({"kind": "schedule", "cron": "* * * * *"}), now=T0
    )
    await tick(sessionmaker, settings, T0 + timedelta(seconds=45))
    assert len(await slots_of(session, wf.id)) == 1
    # A dispatcher with a stale view (next_run_at still at the fired slot) inserts
    # nothing: the unique (trigger_id, scheduled_for) refuses the second row.
    trigger = await session.scalar(select(Trigger).where(Trigger.workflow_id == wf.id))
    assert trigger is not None
    trigger.next_run_at = T0.replace(second=0) + timedelta(minutes=1)
    await session.flush()
    assert await tick(sessionmaker, settings, T0 + timedelta(seconds=50)) == []
    assert len(await slots_of(session, wf.id)) == 1


async def test_two_dispatchers_racing_create_exactly_one_run_per_slot(
    committed: tuple[async_sessionmaker[AsyncSession], object], settings: Settings
) -> None:
    maker, new_workspace = committed
    workspace = await new_workspace()  # type: ignore[operator]
    async with maker() as session:
        workflows = [
            await published(
                session, workspace, with_trigger({"kind": "schedule", "cron": "* * * * *"}), now=T0
            )
            for _ in range(5)
        ]
        await session.commit()
    now = T0
    for _ in range(12):
        now += timedelta(seconds=20)
        # Two beats (or two dispatch tasks) at the same moment, on two connections.
        await asyncio.gather(tick(maker, settings, now), tick(maker, settings, now))
    async with maker() as session:
        for wf in workflows:
            slots = await slots_of(session, wf.id)
            assert slots == [T0.replace(second=0) + timedelta(minutes=i) for i in range(1, 5)]
        dupes = await session.scalar(
            select(func.count()).select_from(
                select(WorkflowExecution.trigger_id, WorkflowExecution.scheduled_for)
                .where(WorkflowExecution.workspace_id == workspace.id)
                .group_by(WorkflowExecution.trigger_id, WorkflowExecution.scheduled_for)
                .having(func.count() > 1)
                .subquery()
            )
        )
        assert dupes == 0


async def test_misfire_policies_after_beat_was_down(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    workspace = await make_workspace(session)
    skip = await published(
        session, workspace, with_trigger({"kind": "schedule", "cron": "0 * * * *"}), now=T0
    )
    once = await published(
        session,
        workspace,
        with_trigger({"kind": "schedule", "cron": "0 * * * *", "misfire": "fire_once"}),
        now=T0,
    )
    # Beat comes back at 13:30 after being down since 09:00: 10, 11, 12, 13 missed.
    await tick(sessionmaker, settings, datetime(2026, 1, 5, 13, 30, tzinfo=UTC))
    assert await slots_of(session, skip.id) == []
    assert await slots_of(session, once.id) == [datetime(2026, 1, 5, 13, tzinfo=UTC)]
    # Both are back on their slots afterwards.
    await tick(sessionmaker, settings, datetime(2026, 1, 5, 14, 0, 10, tzinfo=UTC))
    assert await slots_of(session, skip.id) == [datetime(2026, 1, 5, 14, tzinfo=UTC)]
    assert len(await slots_of(session, once.id)) == 2


async def test_a_schedule_in_a_time_zone_fires_at_local_time_across_dst(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    workspace = await make_workspace(session)
    start = datetime(2026, 3, 27, 12, tzinfo=UTC)
    wf = await published(
        session,
        workspace,
        with_trigger({"kind": "schedule", "cron": "0 9 * * *", "timezone": "Europe/Paris"}),
        now=start,
    )
    for day in range(4):
        for hour in (7, 8):
            await tick(
                sessionmaker,
                settings,
                start.replace(hour=hour, minute=0, second=10) + timedelta(days=day + 1),
            )
    assert await slots_of(session, wf.id) == [
        datetime(2026, 3, 28, 8, tzinfo=UTC),  # 09:00 CET
        datetime(2026, 3, 29, 7, tzinfo=UTC),  # 09:00 CEST
        datetime(2026, 3, 30, 7, tzinfo=UTC),
        datetime(2026, 3, 31, 7, tzinfo=UTC),
    ]


async def test_an_interval_schedule_fires_every_interval_from_when_it_started(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    workspace = await make_workspace(session)
    wf = await published(
        session, workspace, with_trigger({"kind": "schedule", "interval_s": 300}), now=T0
    )
    now = T0
    while now < T0 + timedelta(minutes=16):
        await tick(sessionmaker, settings, now)
        now += timedelta(seconds=15)
    assert await slots_of(session, wf.id) == [T0 + timedelta(minutes=5 * i) for i in (1, 2, 3)]


async def test_a_schedule_that_no_longer_reads_does_not_stop_the_others(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """One stored schedule the validator now refuses (a rule added since, a row edited by
    hand) rolled back the whole dispatch pass on every tick: no schedule fired anywhere.
    Now it stops being due, and the others fire."""
    workspace = await make_workspace(session)
    good = await published(
        session, workspace, with_trigger({"kind": "schedule", "cron": "*/5 * * * *"}), now=T0
    )
    bad = await published(
        session, workspace, with_trigger({"kind": "schedule", "cron": "*/5 * * * *"}), now=T0
    )
    broken = await session.scalar(select(Trigger).where(Trigger.workflow_id == bad.id))
    assert broken is not None
    broken.config = {**broken.config, "cron": "not a cron"}
    await session.flush()
    later = T0 + timedelta(minutes=5)
    await tick(sessionmaker, settings, later)
    assert await slots_of(session, good.id) == [T0.replace(second=0) + timedelta(minutes=5)]
    assert await slots_of(session, bad.id) == []
    await session.refresh(broken)
    assert broken.next_run_at is None
