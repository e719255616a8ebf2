"""Settings: the one configuration root, read from the environment only.

Top-level `DATABASE_URL` and `REDIS_URL` keep the names every platform sets; everything
else lives in nested groups addressed with a double underscore, e.g.
`CELERY__TASK_TIME_LIMIT_S=3900` or `FLOWER__PASSWORD=...`.
"""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["development", "test", "staging", "production"]

# Secrets that ship in the code so `make run` works offline. A deployment that still
# uses one of them is refused outside development and test (see Settings._no_defaults).
DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"  # noqa: S105 - refused in production
DEV_ENCRYPTION_KEY = "dev-insecure-encryption-key-change-me"
DEV_FLOWER_PASSWORD = "flower"  # noqa: S105 - refused in production


class LogSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # None: JSON everywhere except development, where people read the console.
    json_output: bool | None = None


class DatabaseSettings(BaseModel):
    pool_size: int = Field(default=10, ge=1, le=200)
    max_overflow: int = Field(default=10, ge=0, le=200)
    pool_timeout_s: float = Field(default=10.0, gt=0)
    # Statements that run longer than this are cancelled by PostgreSQL itself.
    statement_timeout_ms: int = Field(default=30_000, ge=0)
    echo: bool = False
    # Test each pooled connection before use (a round trip per checkout): survives a
    # PostgreSQL restart without one failed request per stale connection.
    pool_pre_ping: bool = True
    # ...but only a connection idle at least this long (0: every checkout). One in
    # constant use was proven alive moments ago; a dead one among them fails one
    # statement, and SQLAlchemy then recycles the whole pool (README: the API's speed).
    pre_ping_idle_s: float = Field(default=1.0, ge=0)
    # The API's hot reads (backend/kit/hotpath.py): autocommit connections of their own,
    # per API process, beside the pool above. 0 turns the hot reads off.
    hot_pool_size: int = Field(default=4, ge=0, le=100)


class RedisSettings(BaseModel):
    socket_timeout_s: float = Field(default=5.0, gt=0)
    socket_connect_timeout_s: float = Field(default=2.0, gt=0)


class CelerySettings(BaseModel):
    # Defaults to REDIS_URL: one Redis carries the broker, results and events.
    broker_url: str | None = None
    result_backend: str | None = None
    # Hard limit: the worker kills a task that runs longer. An execution has its own
    # timeout (default 3600 s), enforced well inside this.
    task_time_limit_s: int = Field(default=3900, ge=10)
    task_soft_time_limit_s: int = Field(default=3840, ge=5)
    # Redis redelivers a message not acked within this many seconds. It must outlast
    # the longest task (and any countdown), or a slow task runs twice (celery#2599).
    visibility_timeout_s: int = Field(default=7200, ge=60)
    worker_concurrency: int | None = Field(default=None, ge=1)
    result_expires_s: int = Field(default=86_400, ge=60)

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> CelerySettings:
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError("task_soft_time_limit_s must be below task_time_limit_s")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                "visibility_timeout_s must be longer than task_time_limit_s, "
                "or Redis redelivers tasks that are still running"
            )
        return self

    @property
    def max_countdown_s(self) -> int:
        """The longest ETA/countdown a task may be given without risking redelivery."""
        return self.visibility_timeout_s - self.task_time_limit_s


class FlowerSettings(BaseModel):
    port: int = Field(default=5555, ge=1, le=65535)
    address: str = "127.0.0.1"
    user: str = "admin"
    password: SecretStr = SecretStr(DEV_FLOWER_PASSWORD)


class SecuritySettings(BaseModel):
    # Signs tokens (JWT) and anything else that must not be forged.
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    # Encrypts secrets at rest (credentials, provider keys). Rotate by moving the old
    # key into previous_encryption_keys: it still decrypts, the new one encrypts.
    encryption_key: SecretStr = SecretStr(DEV_ENCRYPTION_KEY)
    previous_encryption_keys: list[SecretStr] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)


class AuthSettings(BaseModel):
    # Pinned here and passed to PyJWT as the only accepted algorithm: the token's own
    # header never chooses (no `alg: none`, no RS/HS confusion).
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    jwt_issuer: str = "orchestration-studio"
    jwt_audience: str = "orchestration-studio-api"
    access_token_ttl_s: int = Field(default=900, ge=60)
    refresh_token_ttl_s: int = Field(default=7 * 86_400, ge=300)
    otp_ttl_s: int = Field(default=300, ge=30)
    otp_max_attempts: int = Field(default=5, ge=1)
    # Rate limits in the `limits` notation: "N per <amount> <unit>". "Network" is an
    # IPv4 address or an IPv6 /64.
    # Code requests per network, and per address from each network: one network's
    # requests never stop another's.
    otp_request_limit: str = "5 per 15 minutes"
    # Code mails to one address from networks it has not signed in from lately (a guard
    # for its inbox); a network it signed in from is never held to it.
    otp_address_request_limit: str = "20 per hour"
    otp_verify_limit: str = "10 per 15 minutes"
    # Wrong codes for one address, from any network, past the first few lock it out for
    # base, 2 x base, 4 x base ... up to max; counted over the window, cleared by a
    # sign-in. The lock holds the networks that sent wrong codes: another network's own
    # fresh code gets past it, fresh networks sharing `otp_lockout_bypass_limit` wrong
    # codes per address (networks it signed in from do not). The sums are in the README.
    otp_lockout_free_failures: int = Field(default=5, ge=0)
    otp_lockout_base_s: int = Field(default=60, ge=1)
    otp_lockout_max_s: int = Field(default=3600, ge=1)
    otp_lockout_window_s: int = Field(default=86_400, ge=60)
    otp_lockout_bypass_limit: str = "1 per hour"
    api_rate_limit: str = "1000 per hour"
    # How long an API process may answer from what it last read about a credential and
    # a workspace membership (README: the API's speed). A revoked session or key, a
    # disabled account, a removed member or a lowered role takes effect within this
    # bound everywhere; 0 turns the cache off.
    principal_cache_ttl_s: float = Field(default=2.0, ge=0, le=5)
    invitation_ttl_s: int = Field(default=7 * 86_400, ge=300)
    invite_limit: str = "50 per hour"


class ModelPrice(BaseModel):
    """USD per million tokens for models whose name starts with `model`, in force from
    `since`. Cache writes and reads default to Anthropic's 1.25x and 0.1x of input."""

    model: str = Field(min_length=1)
    since: date
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)
    cache_read_per_mtok: float | None = Field(default=None, ge=0)

    @property
    def cache_write(self) -> float:
        return (
            self.input_per_mtok * 1.25
            if self.cache_write_per_mtok is None
            else self.cache_write_per_mtok
        )

    @property
    def cache_read(self) -> float:
        return (
            self.input_per_mtok * 0.1
            if self.cache_read_per_mtok is None
            else self.cache_read_per_mtok
        )


def _price(model: str, since: str, input_per_mtok: float, output_per_mtok: float) -> ModelPrice:
    return ModelPrice(
        model=model,
        since=date.fromisoformat(since),
        input_per_mtok=input_per_mtok,
        output_per_mtok=output_per_mtok,
    )


# Published list prices as checked on the date given; the longest matching prefix in
# force on the day of the call wins, so a price change is a new dated row, and old
# runs keep the cost they were reported with. Operators override the whole table with
# ANTHROPIC__PRICES (JSON).
DEFAULT_PRICES: tuple[ModelPrice, ...] = (
    _price("claude-3-opus", "2024-03-04", 15.0, 75.0),
    _price("claude-opus-4-0", "2025-05-22", 15.0, 75.0),
    _price("claude-opus-4-1", "2025-08-05", 15.0, 75.0),
    _price("claude-opus", "2025-11-24", 5.0, 25.0),
    _price("claude-sonnet", "2024-06-20", 3.0, 15.0),
    _price("claude-3-5-haiku", "2024-11-04", 0.8, 4.0),
    _price("claude-haiku", "2025-10-15", 1.0, 5.0),
)


class AnthropicSettings(BaseModel):
    # Unset: ANTHROPIC_API_KEY from the environment, as the SDK reads it.
    api_key: SecretStr | None = None
    # Unset: ANTHROPIC_BASE_URL from the environment, else the public API.
    base_url: str | None = None
    default_model: str = "claude-sonnet-5-5"
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    # The SDK's own retries of 429/5xx/529 (it honours retry-after).
    max_retries: int = Field(default=2, ge=0, le=10)
    # Upper bound of POST /agents/{id}/test, whatever the agent asks for.
    test_timeout_s: float = Field(default=60.0, gt=0, le=600)
    # Model calls one agent run may make, sub-agents included.
    max_calls_per_run: int = Field(default=50, ge=1, le=10_000)
    prices: list[ModelPrice] = Field(default_factory=lambda: list(DEFAULT_PRICES))


class GenerateSettings(BaseModel):
    """Text to workflow (POST /workflows/generate) and model suggestions."""

    # Unset: anthropic.default_model.
    model: str | None = None
    max_tokens: int = Field(default=8192, ge=256, le=64_000)
    # After the first answer, rounds in which the validator's problems go back to the
    # model; a draft still invalid after them is returned with its problems.
    max_repair_rounds: int = Field(default=2, ge=0, le=10)
    # Estimated spend (price table) one request may reach before no further round is
    # started; a provider spend-limit answer is refused with 402 at once.
    max_cost_usd: float = Field(default=0.5, ge=0, le=100)
    # The whole request, every round included.
    timeout_s: float = Field(default=180.0, gt=0, le=1800)
    # Strict tool input (grammar-constrained); a model that refuses it is asked again
    # without, once per request.
    strict_tools: bool = True
    # Per workspace: every request spends money.
    rate_limit: str = "60 per hour"
    # How often beat recomputes run-history suggestions, and the window they look at.
    suggestions_interval_s: float = Field(default=3600.0, ge=60)
    suggestions_window_days: int = Field(default=30, ge=1, le=365)
    # Run-history rules (backend/suggestions/rules.py): the finished runs in the window
    # a rule about rates, percentiles or branches needs before it speaks.
    suggestions_min_runs: int = Field(default=5, ge=1, le=100_000)
    # Transient failures of a node with no retry for them that make a suggestion.
    suggestions_min_transient_failures: int = Field(default=2, ge=1, le=100_000)
    # A node whose p95 duration reaches this share of its time limit.
    suggestions_timeout_ratio: float = Field(default=0.8, gt=0, le=1)
    # An agent node whose share of its runs' cost reaches this.
    suggestions_cost_share: float = Field(default=0.6, gt=0, le=1)
    # The cheaper model the cost rule proposes (only to nodes on a dearer one).
    suggestions_economy_model: str = Field(default="claude-haiku-4-5", min_length=1)
    # Suggestions one model request (POST .../suggestions/generate) may return.
    suggestions_max_generated: int = Field(default=5, ge=1, le=20)


class EngineSettings(BaseModel):
    # A worker holds a run for this long; its process's heartbeat renews every lease it
    # holds each third of it. A run whose lease lapsed (its worker died) is someone
    # else's to resume: within lease_s + reaper_interval_s of the death (about 13 s).
    lease_s: int = Field(default=10, ge=3, le=3600)
    # Claims of one run before it is failed as poison (a crash that repeats).
    max_deliveries: int = Field(default=5, ge=1, le=100)
    # How often a worker process looks for cancel requests on the runs it holds.
    watch_interval_s: float = Field(default=0.25, gt=0, le=10)
    # A pending run not claimed within this long is re-enqueued (its message was lost).
    pending_grace_s: int = Field(default=60, ge=5)
    reaper_interval_s: float = Field(default=3.0, ge=1)
    # Runs one worker process carries at once on its event loop (I/O-bound work).
    runs_per_process: int = Field(default=32, ge=1, le=1000)
    # A claim that fails on the database is retried this long before the message goes
    # back to the queue (a restart or failover costs seconds, not a reaper pass).
    claim_retry_s: float = Field(default=20.0, ge=0, le=300)
    # On shutdown, runs in flight get this long to finish before they are handed back.
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=600)
    # The longest `POST /executions?wait=` holds a request open for the run to end.
    max_wait_s: float = Field(default=60.0, ge=0, le=600)
    # Retry waits this short happen in place; longer ones release the worker slot.
    inline_retry_max_s: float = Field(default=0.5, ge=0, le=5)
    max_output_bytes: int = Field(default=1_000_000, ge=1024)
    max_sub_workflow_depth: int = Field(default=5, ge=1, le=50)
    # How often finished runs' event logs are copied from Redis to PostgreSQL.
    archive_interval_s: float = Field(default=15.0, ge=1)


class HttpSettings(BaseModel):
    # Operator allow-list of addresses outbound requests may reach although they are
    # private, loopback or link-local (CIDRs). Empty: none.
    allow_private_networks: list[str] = Field(default_factory=list)
    max_redirects: int = Field(default=5, ge=0, le=20)
    user_agent: str = "OrchestrationStudio/0.1"


class TriggerSettings(BaseModel):
    # How often beat runs triggers.dispatch_due; a slot fires at most this late.
    dispatch_interval_s: float = Field(default=15.0, ge=1, le=300)
    # A slot older than this when the dispatcher sees it was missed (beat was down);
    # the trigger's misfire policy decides (skip, or fire once).
    misfire_grace_s: int = Field(default=60, ge=1)
    # Due schedules one dispatch tick claims per transaction.
    dispatch_batch: int = Field(default=200, ge=1, le=10_000)
    webhook_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Longest ?wait= a webhook caller may ask for (and when_finished's default).
    webhook_max_wait_s: float = Field(default=30.0, gt=0, le=300)
    # Per webhook token; the endpoint is public.
    webhook_rate_limit: str = "600 per minute"


class NotificationSettings(BaseModel):
    max_retries: int = Field(default=5, ge=0, le=20)
    # Exponential backoff between attempts: base, doubled each time, capped.
    backoff_s: float = Field(default=10.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class MaintenanceSettings(BaseModel):
    # Executions (and their node rows) older than this are deleted, unless the
    # workspace's settings say otherwise ({"retention_days": n}).
    retention_days: int = Field(default=30, ge=1, le=3650)
    retention_batch: int = Field(default=1000, ge=1, le=100_000)
    interval_s: float = Field(default=3600.0, ge=10)


class RealtimeSettings(BaseModel):
    # Application-level ping on idle WebSockets and SSE streams.
    heartbeat_s: float = Field(default=20.0, gt=0, le=300)
    # A connection is closed after this long (4000: reconnect and resume); one whose
    # credential expires sooner is closed then (4401).
    max_connection_s: float = Field(default=3600.0, gt=0)
    # Events queued for one client before it counts as too slow (closed with 4408).
    queue_size: int = Field(default=1000, ge=10, le=100_000)
    # How often the API checks followed executions for events pub/sub dropped.
    poll_s: float = Field(default=1.0, gt=0, le=60)
    # How long a new WebSocket has to send its first message.
    hello_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # A client that cannot take one message in this long is closed as too slow (4408).
    send_timeout_s: float = Field(default=30.0, gt=0, le=600)


class SmtpSettings(BaseModel):
    # Unset host: mail is written to the log instead (development and tests only).
    host: str | None = None
    port: int = Field(default=587, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    starttls: bool = True
    use_tls: bool = False
    sender: str = "Orchestration Studio <no-reply@localhost>"
    timeout_s: float = Field(default=15.0, gt=0)


class StorageSettings(BaseModel):
    """Workspace files for the file_read / file_write nodes. Each workspace sees only
    its own directory (local) or key prefix (S3); nothing outside it is reachable."""

    backend: Literal["local", "s3"] = "local"
    # Relative to the working directory. Local storage is per host: with workers on
    # several hosts, use a shared volume or S3.
    local_root: str = ".data/files"
    max_read_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_write_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    # Any S3-compatible service (AWS, MinIO, R2, ...); unset endpoint: AWS itself.
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_region: str | None = None
    # Unset: boto3's own chain (environment, instance or pod role).
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    # Keys are <s3_prefix><workspace_id>/<path>, so one bucket can serve several uses.
    s3_prefix: str = ""
    s3_addressing_style: Literal["auto", "virtual", "path"] = "auto"
    s3_timeout_s: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> StorageSettings:
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("STORAGE__S3_BUCKET must be set when STORAGE__BACKEND=s3")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError(
                "STORAGE__S3_ACCESS_KEY_ID and STORAGE__S3_SECRET_ACCESS_KEY go together"
            )
        return self


class StdioCommand(BaseModel):
    """An MCP server an operator allows tenants to start over stdio: a fixed command
    line (tenants never supply one: that would be remote code execution) and the names
    of the environment variables a tenant may set for it (tokens, say)."""

    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env_keys: list[str] = Field(default_factory=list)
    description: str = ""


class McpSettings(BaseModel):
    """MCP servers (backend/mcp): timeouts and caps of every outbound MCP connection."""

    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    call_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # A tool result larger than this (as JSON) fails the call rather than flooding a run.
    max_result_bytes: int = Field(default=1_000_000, ge=1024)
    # Tools one discovery stores at most (a server listing thousands is refused).
    max_tools: int = Field(default=200, ge=1, le=10_000)
    # Operator-listed stdio servers by name, e.g.
    # MCP__STDIO_SERVERS='{"files": {"command": "mcp-server-files", "args": ["/srv"]}}'.
    stdio_servers: dict[str, StdioCommand] = Field(default_factory=dict)


class ToolsSettings(BaseModel):
    """/api/v1/tools: per-user budget, web read caps and the pluggable providers."""

    rate_limit: str = "100 per hour"
    chat_max_tokens: int = Field(default=4096, ge=1, le=64_000)
    web_read_timeout_s: float = Field(default=15.0, gt=0, le=120)
    web_read_max_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # Characters of main text a web read returns at most.
    web_read_max_chars: int = Field(default=100_000, ge=100)
    # Web search: "searxng" (GET <url>?q=&format=json), "brave" (X-Subscription-Token),
    # or "jina" (GET <url>/<query>, JSON); unset: 424.
    search_provider: Literal["searxng", "brave", "jina"] | None = None
    search_url: str | None = None
    search_api_key: SecretStr | None = None
    search_timeout_s: float = Field(default=15.0, gt=0, le=120)
    # Image generation: an OpenAI-compatible /images/generations endpoint; unset: 424.
    image_url: str | None = None
    image_api_key: SecretStr | None = None
    image_model: str = "gpt-image-1"
    image_timeout_s: float = Field(default=120.0, gt=0, le=600)
    # Uploaded files (POST /tools/files/upload).
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)


class DatabaseNodeSettings(BaseModel):
    """The `database` action node: bounds of one statement against a user's database."""

    connect_timeout_s: float = Field(default=10.0, gt=0, le=120)
    statement_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    max_rows: int = Field(default=1000, ge=1, le=100_000)


class AnalyticsSettings(BaseModel):
    # How often beat sends analytics.aggregate (each pass folds in what changed since
    # the last one, late finishes of old runs included).
    aggregate_interval_s: float = Field(default=60.0, ge=5, le=3600)
    # Answers of the analytics API are kept this long in Redis (0: not cached).
    cache_ttl_s: float = Field(default=10.0, ge=0, le=600)
    # The widest since..until a request may ask for, and the most points in a series.
    max_range_days: int = Field(default=400, ge=1, le=3660)
    max_points: int = Field(default=2000, ge=10, le=100_000)


class MetricsSettings(BaseModel):
    # Bearer token GET /metrics requires. Unset: /metrics answers only on the private
    # port below (and 404 on the public one), so nothing is ever open by default.
    token: SecretStr | None = None
    # The API's private metrics listener (0: none) and the worker's aggregated endpoint,
    # both bound to `address`; the NetworkPolicy keeps these ports inside the cluster.
    address: str = "127.0.0.1"
    api_port: int = Field(default=0, ge=0, le=65535)
    worker_port: int = Field(default=9808, ge=0, le=65535)


class TracingSettings(BaseModel):
    # Traces go out only when OTEL_EXPORTER_OTLP_ENDPOINT is set (the SDK's own variable,
    # with OTEL_EXPORTER_OTLP_HEADERS etc.); this names the service in them.
    service_name: str = "orchestration-studio"
    # Fraction of traces kept (parent-based: a trace is kept or dropped whole).
    sample_ratio: float = Field(default=1.0, ge=0, le=1)


class QuotaSettings(BaseModel):
    """Limits per workspace (None: unlimited). An operator overrides any of them for one
    workspace with `python -m backend.quotas set <id> runs_per_day=500` (null lifts it);
    a workspace's own settings never can (see backend/quotas)."""

    runs_per_day: int | None = Field(default=None, ge=0)
    concurrent_runs: int | None = Field(default=None, ge=0)
    ai_tokens_per_month: int | None = Field(default=None, ge=0)
    ai_cost_per_month_usd: float | None = Field(default=None, ge=0)
    tool_calls_per_hour: int | None = Field(default=None, ge=0)
    # Redis counters are rebuilt from PostgreSQL at least this often (and at once after
    # a Redis flush), so a lost counter never grants a second quota.
    reconcile_s: int = Field(default=60, ge=1, le=86_400)
    # A workspace's owners and administrators are notified (kind `quota.warning`) the
    # first time its use of a counted quota reaches each of these percentages of the
    # limit in a period (once per threshold and period; a refusal counts as 100). []: off.
    warn_at_percent: list[int] = Field(default_factory=lambda: [80, 100], max_length=10)

    @field_validator("warn_at_percent")
    @classmethod
    def _percentages(cls, value: list[int]) -> list[int]:
        if any(not 1 <= v <= 100 for v in value):
            raise ValueError("each warning threshold is a percentage from 1 to 100")
        return sorted(set(value))


class TaskSettings(BaseModel):
    """People in the loop (issue 16): tasks, one-time links, resume URLs."""

    # The API's address as people and outside systems reach it: the base of the
    # one-time decision links in e-mails and of wait steps' resume URLs.
    public_url: str = Field(default="http://127.0.0.1:8000", pattern=r"^https?://[^\s]+$")
    # A decision link lives this long at most (never past its task's expiry).
    link_ttl_s: int = Field(default=7 * 86_400, ge=300, le=366 * 86_400)
    # How often beat expires open tasks past their deadline and wakes their runs.
    expire_interval_s: float = Field(default=30.0, ge=1, le=3600)
    resume_max_body_bytes: int = Field(default=256 * 1024, ge=1024, le=10 * 1024 * 1024)
    # Per resume URL / decision link (they are public routes).
    link_rate_limit: str = "60 per minute"


class PushSettings(BaseModel):
    """Push channels: Web Push (VAPID) for browsers, FCM HTTP v1 for mobile devices.
    Unset keys switch a channel off (subscriptions are kept, nothing is sent)."""

    # VAPID key pair: the private key as PEM or base64url (raw 32 bytes), the public
    # key as browsers want it (base64url uncompressed point; GET /notifications/push-key).
    vapid_private_key: SecretStr | None = None
    vapid_public_key: str | None = None
    vapid_subject: str = "mailto:admin@localhost"
    # The Firebase service account's JSON (its token_uri is where tokens come from).
    fcm_service_account: SecretStr | None = None
    fcm_project_id: str | None = None
    fcm_endpoint: str = Field(default="https://fcm.googleapis.com", pattern=r"^https?://[^\s]+$")
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    # How long a push service keeps an undelivered message (Web Push TTL header).
    ttl_s: int = Field(default=86_400, ge=0, le=28 * 86_400)


class N8nSettings(BaseModel):
    """n8n fleets: the client for instances' public API, the sync, the error intake."""

    # Beat's pass over instances; an instance is synced when its last sync is older.
    sync_interval_s: float = Field(default=60.0, ge=5, le=86_400)
    # How long one sync may hold an instance before another may take it.
    sync_claim_s: int = Field(default=300, ge=30, le=3600)
    # The first sync of an instance fetches executions started this far back.
    executions_lookback_days: int = Field(default=7, ge=1, le=365)
    # Executions pages (of page_size) one sync reads; the rest waits for the next one.
    max_execution_pages: int = Field(default=20, ge=1, le=1000)
    page_size: int = Field(default=100, ge=1, le=250)
    # Failed executions per sync whose error message and node are fetched one by one.
    error_details_per_sync: int = Field(default=50, ge=0, le=1000)
    request_timeout_s: float = Field(default=15.0, gt=0, le=300)
    # Attempts after the first on 429/5xx and connection errors, with backoff.
    retries: int = Field(default=3, ge=0, le=10)
    backoff_s: float = Field(default=0.5, ge=0, le=60)
    max_response_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    # Per workspace per UTC day (None: unlimited): the defaults of the quotas
    # n8n_toggles_per_day and n8n_refreshes_per_day. An operator overrides them per
    # workspace (`python -m backend.quotas set`); the workspace's administrators may only
    # lower them for themselves, in its settings: {"quotas": {"n8n_toggles_per_day": 50}}.
    toggles_per_day: int | None = Field(default=None, ge=0)
    refreshes_per_day: int | None = Field(default=None, ge=0)
    # Where an instance's error workflow posts (our public base URL as n8n reaches it);
    # unset: the base URL of the request that installs it.
    intake_base_url: str | None = None
    intake_rate_limit: str = "600 per minute"
    intake_max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    # Environments (issue 18): how often beat compares each environment with its
    # baselines, and the UTC hour of the nightly snapshots.
    drift_interval_s: float = Field(default=300.0, ge=30, le=86_400)
    nightly_snapshot_hour: int = Field(default=2, ge=0, le=23)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
    )

    environment: Environment = "development"
    app_name: str = "Orchestration Studio"
    # Placeholders for the development launcher to replace; never used unset in earnest
    # because scripts/devstack.py exports real URLs before anything starts.
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # How long /health/ready waits for each dependency before calling it down.
    health_timeout_s: float = Field(default=2.0, gt=0, le=30)

    log: LogSettings = LogSettings()
    db: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    celery: CelerySettings = CelerySettings()
    flower: FlowerSettings = FlowerSettings()
    security: SecuritySettings = SecuritySettings()
    auth: AuthSettings = AuthSettings()
    smtp: SmtpSettings = SmtpSettings()
    anthropic: AnthropicSettings = AnthropicSettings()
    engine: EngineSettings = EngineSettings()
    generate: GenerateSettings = GenerateSettings()
    triggers: TriggerSettings = TriggerSettings()
    notifications: NotificationSettings = NotificationSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    http: HttpSettings = HttpSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    storage: StorageSettings = StorageSettings()
    mcp: McpSettings = McpSettings()
    tools: ToolsSettings = ToolsSettings()
    dbnode: DatabaseNodeSettings = DatabaseNodeSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    quotas: QuotaSettings = QuotaSettings()
    n8n: N8nSettings = N8nSettings()
    tasks: TaskSettings = TaskSettings()
    push: PushSettings = PushSettings()

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, url: str) -> str:
        """Accept the URL forms platforms hand out and pin the psycopg 3 driver."""
        for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        if not url.startswith("postgresql+psycopg://"):
            raise ValueError("DATABASE_URL must be a PostgreSQL URL (postgresql://...)")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must start with redis://, rediss:// or unix://")
        return url

    @model_validator(mode="after")
    def _no_defaults(self) -> Settings:
        if self.environment in ("development", "test"):
            return self
        defaults = {
            "SECURITY__SECRET_KEY": (self.security.secret_key, DEV_SECRET_KEY),
            "SECURITY__ENCRYPTION_KEY": (self.security.encryption_key, DEV_ENCRYPTION_KEY),
            "FLOWER__PASSWORD": (self.flower.password, DEV_FLOWER_PASSWORD),
        }
        unsafe = [
            name for name, (value, dev) in defaults.items() if value.get_secret_value() == dev
        ]
        short = [
            name
            for name, (value, _) in defaults.items()
            if name.startswith("SECURITY__") and len(value.get_secret_value()) < 32
        ]
        if unsafe:
            raise ValueError(
                f"{', '.join(unsafe)} still hold the development default; "
                f"set real secrets when ENVIRONMENT={self.environment}"
            )
        if short:
            raise ValueError(f"{', '.join(short)} must be at least 32 characters")
        placeholders = [
            name
            for name, (value, _) in defaults.items()
            if any(
                w in value.get_secret_value().upper() for w in ("REPLACE", "CHANGE_ME", "CHANGEME")
            )
        ]
        if placeholders:
            raise ValueError(f"{', '.join(placeholders)} still hold a template placeholder")
        sec = self.security
        if sec.secret_key.get_secret_value() == sec.encryption_key.get_secret_value():
            raise ValueError("SECURITY__SECRET_KEY and SECURITY__ENCRYPTION_KEY must differ")
        if not self.smtp.host:
            raise ValueError(
                f"SMTP__HOST must be set when ENVIRONMENT={self.environment}: "
                "sign-in codes would only reach the log"
            )
        if "*" in self.security.cors_origins:
            raise ValueError("SECURITY__CORS_ORIGINS may not contain '*' outside development")
        return self

    @property
    def broker_url(self) -> str:
        return self.celery.broker_url or self.redis_url

    @property
    def result_backend(self) -> str:
        return self.celery.result_backend or self.redis_url

    @property
    def log_json(self) -> bool:
        if self.log.json_output is not None:
            return self.log.json_output
        return self.environment != "development"


@lru_cache
def get_settings() -> Settings:
    return Settings()
