"""Image generation through an OpenAI-compatible `/images/generations` endpoint named in
settings (TOOLS__IMAGE_URL), through the SSRF guard like every outbound request."""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

import httpx

from backend.config import Settings
from backend.kit.errors import NotConfigured, UpstreamError, ValidationFailed
from backend.tools.web import check_url, guarded_get, provider_failure

# A few images as base64 in one JSON answer.
MAX_BYTES = 64 * 1024 * 1024
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
)


def _content_type(b64: str) -> str:
    try:
        head = base64.b64decode(b64[:64] + "=" * (-len(b64[:64]) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UpstreamError("the image provider sent an image that is not base64") from None
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _provider_error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)[:500] if message else ""


def check_configured(settings: Settings) -> httpx.URL:
    """The provider's endpoint; 424 naming the setting when there is none."""
    conf = settings.tools
    if not conf.image_url:
        raise NotConfigured(
            "image generation is not configured: set TOOLS__IMAGE_URL (an OpenAI-compatible "
            "/images/generations endpoint) and TOOLS__IMAGE_API_KEY",
            field="TOOLS__IMAGE_URL",
        )
    try:
        return check_url(conf.image_url, field="TOOLS__IMAGE_URL")
    except ValidationFailed as exc:
        raise NotConfigured(
            f"TOOLS__IMAGE_URL is unusable: {exc.detail}", field="TOOLS__IMAGE_URL"
        ) from None


async def generate(
    http: httpx.AsyncClient,
    settings: Settings,
    *,
    prompt: str,
    n: int,
    size: str,
    quality: str | None,
) -> dict[str, Any]:
    """{model, images: [{b64_json | url, content_type, revised_prompt}], usage,
    duration_ms}; 424 when no provider is configured."""
    conf = settings.tools
    url = check_configured(settings)
    body: dict[str, Any] = {"model": conf.image_model, "prompt": prompt, "n": n, "size": size}
    if quality is not None:
        body["quality"] = quality
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if conf.image_api_key is not None:
        headers["Authorization"] = f"Bearer {conf.image_api_key.get_secret_value()}"
    started = time.perf_counter()
    request = http.build_request(
        "POST", url, headers=headers, content=json.dumps(body), timeout=conf.image_timeout_s
    )
    what = "the image provider"
    response, raw = await guarded_get(
        http,
        settings,
        request,
        what=what,
        timeout_s=conf.image_timeout_s,
        max_bytes=MAX_BYTES,
        too_large="an image answer's cap",
        setting="TOOLS__IMAGE_URL",
    )
    if response.status_code == 400:
        # The prompt or a parameter (a size the model does not make, a refused prompt):
        # the caller's to change.
        message = _provider_error_message(raw) or "the request was refused"
        raise ValidationFailed(f"{what} refused the request: {message}", upstream_status=400)
    if not response.is_success:
        raise provider_failure(response, what, "TOOLS__IMAGE_API_KEY")
    try:
        data = json.loads(raw)
    except ValueError:
        raise UpstreamError(f"{what} answered something that is not JSON") from None
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise UpstreamError(f"{what} answered without images")
    images = []
    for item in items[:n]:
        if not isinstance(item, dict):
            continue
        b64 = item.get("b64_json") if isinstance(item.get("b64_json"), str) else None
        link = item.get("url") if isinstance(item.get("url"), str) else None
        if b64 is None and link is None:
            continue
        revised = item.get("revised_prompt")
        images.append(
            {
                "b64_json": b64,
                "url": link,
                "content_type": _content_type(b64) if b64 is not None else None,
                "revised_prompt": revised if isinstance(revised, str) else None,
            }
        )
    if not images:
        raise UpstreamError(f"{what} answered without images")
    usage = data.get("usage")
    return {
        "model": str(data.get("model") or conf.image_model),
        "images": images,
        "usage": usage if isinstance(usage, dict) else None,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def tokens_of(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(input, output) tokens of an images answer's usage, in either naming."""
    if not usage:
        return 0, 0

    def number(*keys: str) -> int:
        for key in keys:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return 0

    return number("input_tokens", "prompt_tokens"), number("output_tokens", "completion_tokens")
