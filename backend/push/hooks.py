"""Notices other domains cause without calling us: an invitation to a workspace reaches
the invited person's inbox (if they already have an account), live and by push.

Hooked on the ORM (the invitation's insert) so the workspaces domain needs no import of
this one; the row is written on the insert's own connection, in its transaction, and the
live notice and the push go out only after that transaction commits.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session, object_session

from backend.kit.logging import get_logger
from backend.kit.tasks import Send, send_from_loop
from backend.models import Invitation, NotificationPreference, User, UserNotification, Workspace

log = get_logger(__name__)
_PENDING = "orch_user_notices"
_inflight: set[asyncio.Task[None]] = set()


def _wants(prefs: Any, channel: str) -> bool:
    switches = prefs.get("invitation") if isinstance(prefs, dict) else None
    if isinstance(switches, dict) and isinstance(switches.get(channel), bool):
        return bool(switches[channel])
    return True


@event.listens_for(Invitation, "after_insert")
def _invited(_: Any, connection: Any, target: Invitation) -> None:
    user = connection.execute(
        select(User.id).where(User.email == target.email, User.is_active.is_(True))
    ).scalar()
    if user is None:
        return
    prefs = connection.execute(
        select(NotificationPreference.preferences).where(NotificationPreference.user_id == user)
    ).scalar()
    name = connection.execute(
        select(Workspace.name).where(Workspace.id == target.workspace_id)
    ).scalar()
    title = f"You are invited to {name}"
    data = {"workspace_id": str(target.workspace_id), "role": target.role}
    session = object_session(target)
    if _wants(prefs or {}, "in_app"):
        row_id = uuid.uuid4()
        connection.execute(
            insert(UserNotification).values(
                id=row_id, user_id=user, workspace_id=target.workspace_id, kind="invitation",
                title=title[:500], body="", data=data,
            )
        )  # fmt: skip
        if session is not None:
            session.info.setdefault(_PENDING, []).append(
                ("publish", user, {"id": str(row_id), "kind": "invitation", "title": title,
                                   "data": data})
            )  # fmt: skip
    channels = [c for c in ("web_push", "fcm") if _wants(prefs or {}, c)]
    if channels and session is not None:
        session.info.setdefault(_PENDING, []).append(
            ("push", user, {"target": f"{user}:{','.join(channels)}", "title": title})
        )


@event.listens_for(Session, "after_commit")
def _send(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    from backend.push.service import PUSH_TASK, user_channel
    from backend.realtime.events import event_log

    pushes = [
        Send(
            PUSH_TASK,
            [[item["target"]], {"title": item["title"], "body": "", "kind": "invitation"}],
        )
        for kind, _, item in pending
        if kind == "push"
    ]
    if pushes:
        send_from_loop(*pushes, what={"notice": "invitation"})
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    async def publish() -> None:
        try:
            for kind, user, item in pending:
                if kind != "publish":
                    continue
                text = json.dumps(
                    {"timestamp": datetime.now(UTC).isoformat(), "type": "notification.created",
                     "notification": item}, default=str,
                )  # fmt: skip
                await event_log().redis.publish(user_channel(user), text)
        except Exception:
            log.warning("notices.user_publish_failed", exc_info=True)

    task = loop.create_task(publish())
    _inflight.add(task)
    task.add_done_callback(_inflight.discard)


@event.listens_for(Session, "after_rollback")
def _drop(session: Session) -> None:
    session.info.pop(_PENDING, None)
