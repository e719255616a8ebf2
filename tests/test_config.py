"""Settings: environment-only, nested groups, and no development secrets in production."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backend.config import Settings

STRONG = "x" * 40


def make(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_nested_groups_come_from_double_underscore_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = make(
        monkeypatch,
        CELERY__TASK_TIME_LIMIT_S="100",
        CELERY__TASK_SOFT_TIME_LIMIT_S="90",
        DB__POOL_SIZE="3",
    )
    assert s.celery.task_time_limit_s == 100
    assert s.db.pool_size == 3


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_production_refuses_development_secrets(
    monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        make(monkeypatch, ENVIRONMENT=environment)
    message = str(info.value)
    assert "SECURITY__SECRET_KEY" in message
    assert "FLOWER__PASSWORD" in message


def test_production_refuses_short_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        make(
            monkeypatch,
            ENVIRONMENT="production",
            SECURITY__SECRET_KEY="short",
            SECURITY__ENCRYPTION_KEY=STRONG,
            FLOWER__PASSWORD="a-real-password",
            SMTP__HOST="smtp.example.com",
        )


def test_production_requires_smtp(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="SMTP__HOST"):
        make(
            monkeypatch,
            ENVIRONMENT="production",
            SECURITY__SECRET_KEY=STRONG,
            SECURITY__ENCRYPTION_KEY=STRONG + "y",
            FLOWER__PASSWORD="a-real-password",
        )


def test_production_accepts_real_secrets_and_keeps_them_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = make(
        monkeypatch,
        ENVIRONMENT="production",
        SECURITY__SECRET_KEY=STRONG,
        SECURITY__ENCRYPTION_KEY=STRONG + "y",
        FLOWER__PASSWORD="a-real-password",
        SMTP__HOST="smtp.example.com",
    )
    assert s.security.secret_key.get_secret_value() == STRONG
    # Secrets never show in a repr or a dump, so they cannot reach a log by accident.
    assert STRONG not in repr(s)
    assert STRONG not in s.model_dump_json()
    assert s.log_json is True


def test_visibility_timeout_must_outlast_the_task_time_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValidationError, match="visibility_timeout_s must be longer"):
        make(
            monkeypatch,
            CELERY__VISIBILITY_TIMEOUT_S="3000",
            CELERY__TASK_TIME_LIMIT_S="3600",
            CELERY__TASK_SOFT_TIME_LIMIT_S="3500",
        )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
    ],
)
def test_database_url_is_pinned_to_psycopg(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    assert make(monkeypatch, DATABASE_URL=given).database_url == expected


def test_non_postgres_database_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="PostgreSQL"):
        make(monkeypatch, DATABASE_URL="sqlite:///x.db")


def test_broker_defaults_to_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    s = make(monkeypatch, REDIS_URL="redis://127.0.0.1:1/3")
    assert s.broker_url == "redis://127.0.0.1:1/3"
    assert s.result_backend == "redis://127.0.0.1:1/3"


def test_template_placeholders_and_shared_keys_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {
        "ENVIRONMENT": "production",
        "FLOWER__PASSWORD": "a-real-password",
        "SMTP__HOST": "smtp.example.com",
        "SECURITY__ENCRYPTION_KEY": STRONG + "y",
    }
    with pytest.raises(ValidationError, match="placeholder"):
        make(monkeypatch, **base, SECURITY__SECRET_KEY="REPLACE_WITH_32_PLUS_RANDOM_CHARACTERS")
    with pytest.raises(ValidationError, match="must differ"):
        make(
            monkeypatch, **{**base, "SECURITY__ENCRYPTION_KEY": STRONG}, SECURITY__SECRET_KEY=STRONG
        )
