"""The shared server fixtures skip when a server is missing, except under CI."""

from __future__ import annotations

import importlib.util

import pytest

from tests.fixtures import servers


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [(None, pytest.skip.Exception), ("", pytest.skip.Exception), ("false", pytest.skip.Exception),
     ("true", pytest.fail.Exception), ("1", pytest.fail.Exception)],
)  # fmt: skip
def test_missing_postgres_skips_unless_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str | None, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(servers, "find_postgres_bin", lambda: None)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="PostgreSQL binaries not found"), servers.postgres_server():
        pass


def test_missing_moto_server_extras_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "flask" else real_find_spec(name),
    )
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="flask"), servers.moto_server():
        pass


def test_postgres_server_answers_with_its_password(
    postgres_server: servers.PostgresServer,
) -> None:
    import psycopg

    with psycopg.connect(postgres_server.dsn, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_server.dsn.replace(postgres_server.password, "x"))


def test_schema_dsns_are_isolated(postgres_server: servers.PostgresServer) -> None:
    import psycopg

    first, second = postgres_server.create_schema(), postgres_server.create_schema()
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute("CREATE TABLE probe (x INTEGER)")
    with psycopg.connect(second, autocommit=True) as conn:
        conn.execute("CREATE TABLE probe (x INTEGER)")
        assert conn.execute("SELECT count(*) FROM probe").fetchone() == (0,)


def test_moto_server_credentials_are_dummies(moto_server: servers.MotoServer) -> None:
    import os

    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert moto_server.endpoint_url.startswith("http://127.0.0.1:")
    assert moto_server.client("s3").list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
