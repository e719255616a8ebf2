"""Where the CLI keeps what it knows between commands: per server, the signed-in
person's tokens (or an API key) and the workspace in use.

One JSON file in the user's config directory (`$STUDIO_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/studio`, else `~/.config/studio`), readable by its owner only
(0600, in a 0700 directory). Credentials are filed under the server that issued them
and are only ever sent back to that server: pointing the CLI at another URL does not
hand your tokens to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

DEFAULT_URL = "http://127.0.0.1:8000"


def config_dir() -> Path:
    explicit = os.environ.get("STUDIO_CONFIG_DIR")
    return Path(explicit) if explicit else Path(typer.get_app_dir("studio", force_posix=False))


def config_path() -> Path:
    return config_dir() / "config.json"


@dataclass
class Server:
    """What we hold for one server."""

    access_token: str | None = None
    refresh_token: str | None = None
    # Unix time at which the access token lapses (refreshed a little before).
    access_expires_at: float | None = None
    api_key: str | None = None
    email: str | None = None
    workspace_id: str | None = None
    workspace_name: str | None = None

    def signed_in(self) -> bool:
        return bool(self.access_token or self.api_key)


@dataclass
class Config:
    current_url: str | None = None
    servers: dict[str, Server] = field(default_factory=dict)

    def server(self, url: str) -> Server:
        return self.servers.setdefault(url, Server())


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--url")
    return url


def load() -> Config:
    path = config_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from None
    servers: dict[str, Server] = {}
    known = set(Server.__dataclass_fields__)
    for url, values in (raw.get("servers") or {}).items():
        if isinstance(values, dict):
            servers[url] = Server(**{k: v for k, v in values.items() if k in known})
    return Config(current_url=raw.get("current_url"), servers=servers)


def save(config: Config) -> None:
    """Write the file atomically with mode 0600 (a reader never sees half a file, and
    the tokens are never readable by others, not even for a moment)."""
    directory = config_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    body: dict[str, Any] = {
        "current_url": config.current_url,
        "servers": {url: asdict(server) for url, server in config.servers.items()},
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".json")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle, indent=2)
        os.replace(tmp, config_path())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
