"""Operators' quota overrides, per workspace (tenants cannot change their own):

    python -m backend.quotas show WORKSPACE_ID
    python -m backend.quotas set WORKSPACE_ID runs_per_day=500 ai_cost_per_month_usd=20
    python -m backend.quotas set WORKSPACE_ID concurrent_runs=null   # unlimited
    python -m backend.quotas clear WORKSPACE_ID                      # settings' defaults

A name left out takes QUOTAS__* from settings. API processes pick a change up within
5 seconds (their cached limits expire)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

from backend.config import get_settings
from backend.kit.db import UnitOfWork, create_engine, create_sessionmaker
from backend.kit.errors import DomainError
from backend.models import Workspace
from backend.quotas import service


def _value(raw: str) -> Any:
    if raw.lower() in ("null", "none", "unlimited"):
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # refused by check_overrides with the name at fault


async def _main(args: argparse.Namespace) -> int:
    settings = get_settings()
    engine = create_engine(settings)
    try:
        async with UnitOfWork(create_sessionmaker(engine)) as uow:
            if await uow.session.get(Workspace, args.workspace_id) is None:
                print(f"no workspace {args.workspace_id}", file=sys.stderr)
                return 2
            if args.command == "set":
                pairs = dict(p.split("=", 1) for p in args.limits if "=" in p)
                if len(pairs) != len(args.limits):
                    print("limits are name=value", file=sys.stderr)
                    return 2
                values = {k: _value(v) for k, v in pairs.items()}
                print(
                    json.dumps(await service.set_overrides(uow.session, args.workspace_id, values))
                )
            elif args.command == "clear":
                print(
                    json.dumps(
                        await service.set_overrides(
                            uow.session, args.workspace_id, {}, replace=True
                        )
                    )
                )
            rows = await service.usage(uow.session, args.workspace_id, settings)
            print(json.dumps(rows, default=str, indent=2))
    except DomainError as exc:
        print(f"{exc.field or 'error'}: {exc.detail}", file=sys.stderr)
        return 2
    finally:
        await engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.quotas", description=__doc__)
    parser.add_argument("command", choices=("show", "set", "clear"))
    parser.add_argument("workspace_id", type=uuid.UUID)
    parser.add_argument("limits", nargs="*", help="name=value (null: unlimited)")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
