"""POST /tools/ai/image against a local OpenAI-compatible images endpoint; 424 when no
provider is configured."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import Settings
from backend.models import Workspace
from tests.support.identity import Actor
from tests.tools.conftest import API, ApiFor, configure, usage_rows
from tests.tools.sites import IMAGE_KEY, PNG, Sites

IMAGE = f"{API}/ai/image"


async def test_images_come_back_with_their_type_and_usage_is_recorded(
    api: httpx.AsyncClient,
    editor: Actor,
    team: Workspace,
    session: AsyncSession,
    local: Settings,
    sites: Sites,
) -> None:
    r = await api.post(
        IMAGE,
        headers=editor.headers,
        json={"prompt": "a lighthouse", "n": 2, "size": "1536x1024", "quality": "low"},
    )
    assert r.status_code == 200, r.text
    made = r.json()
    assert made["model"] == local.tools.image_model and len(made["images"]) == 2
    first = made["images"][0]
    assert base64.b64decode(first["b64_json"]) == PNG
    assert first["content_type"] == "image/png" and first["revised_prompt"] == "a lighthouse!"
    sent = sites.seen("/v1/images/generations")[-1]
    assert sent["headers"]["authorization"] == f"Bearer {IMAGE_KEY}"
    assert '"size": "1536x1024"' in sent["body"] and '"quality": "low"' in sent["body"]
    assert IMAGE_KEY not in r.text
    (row,) = await usage_rows(session, team)
    assert (row.tool, row.model, row.input_tokens, row.output_tokens, row.ok) == (
        "ai_image", local.tools.image_model, 12, 345, True
    )  # fmt: skip


async def test_no_provider_is_424(api_for: ApiFor, local: Settings, editor: Actor) -> None:
    async with api_for(configure(local, image_url=None)) as client:
        r = await client.post(IMAGE, headers=editor.headers, json={"prompt": "x"})
    assert r.status_code == 424, r.text
    assert (r.json()["error"], r.json()["field"]) == ("not_configured", "TOOLS__IMAGE_URL")


async def test_provider_refusals_are_told_apart(
    api: httpx.AsyncClient,
    api_for: ApiFor,
    local: Settings,
    editor: Actor,
    team: Workspace,
    session: AsyncSession,
) -> None:
    refused = await api.post(IMAGE, headers=editor.headers, json={"prompt": "please refuse"})
    assert refused.status_code == 422 and "safety system" in refused.json()["detail"]
    down = await api.post(IMAGE, headers=editor.headers, json={"prompt": "overloaded"})
    assert down.status_code == 503 and down.json()["upstream_status"] == 503
    async with api_for(configure(local, image_api_key=None)) as client:
        keyless = await client.post(IMAGE, headers=editor.headers, json={"prompt": "x"})
    assert keyless.status_code == 502 and keyless.json()["field"] == "TOOLS__IMAGE_API_KEY"
    assert [row.ok for row in await usage_rows(session, team)] == [False, False, False]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": " "},
        {"prompt": "x", "n": 5},
        {"prompt": "x", "size": "huge"},
        {"prompt": "x", "size": "99999x1"},
        {"prompt": "x", "quality": "ultra"},
        {"prompt": "x" * 4001},
    ],
)
async def test_bad_image_input_is_422(
    api: httpx.AsyncClient, editor: Actor, body: dict[str, Any]
) -> None:
    r = await api.post(IMAGE, headers=editor.headers, json=body)
    assert r.status_code == 422, r.text
