"""Fetching secrets (keystore passphrase, HSM PIN) without letting them leak.

A :class:`SecretsProvider` turns a name into a :class:`Secret`. Three ship with signd:

- :class:`EnvSecrets` — an environment variable;
- :class:`FileSecrets` — a file that neither group nor others may read;
- :class:`AwsSecretsManager` — ``GetSecretValue`` through boto3, optionally one field of a JSON
  secret.

Config values name a secret by reference rather than holding it: ``env:NAME``,
``file:/path/to/pin`` or ``aws-sm:secret-id#field`` (or the table form
``{provider = "aws-sm", name = "hsm", field = "pin"}``), and :func:`resolve_reference` fetches
it. Values come back wrapped in :class:`Secret`; error messages and logs name the source,
never the value.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import stat
import sys
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, DependencyUnavailable

log = logging.getLogger(__name__)

KEYSTORE_PASSPHRASE_ENV: Final = "SIGND_KEYSTORE_PASSPHRASE"  # noqa: S105 - a variable name
"""The keystore passphrase (host side only)."""
HSM_PIN_ENV: Final = "SIGND_HSM_PIN"
"""The HSM PIN (wherever HSM custody runs: the host, or the enclave)."""


def environment_only(
    names: Collection[str], prefixes: tuple[str, ...] = (), environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The variables of the environment (``environ``, else this process's) named in ``names``
    or starting with one of ``prefixes``: for a child that needs nothing else, so that no
    secret of this process's, whatever its variable's name, reaches its ``/proc``."""
    source = os.environ if environ is None else environ
    return {
        name: value for name, value in source.items() if name in names or name.startswith(prefixes)
    }


def read_secret_file(path: Path) -> Secret:
    """Read a secret from a file that only its owner can read; strips one trailing newline."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"{path} is readable by group or others; run: chmod 600 {path}"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read secret file {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8", errors="strict").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ConfigurationError(f"secret file {path} is not UTF-8 text") from None
    if not text:
        raise ConfigurationError(f"secret file {path} is empty")
    return Secret(text)


def resolve_secret(
    *,
    what: str,
    env_var: str,
    file: Path | None = None,
    prompt: bool = True,
    confirm: bool = False,
) -> Secret:
    """The secret from ``env_var``, else ``file``, else a prompt; else a clear error."""
    value = os.environ.get(env_var)
    if value:
        return Secret(value)
    if file is not None:
        return read_secret_file(file)
    if prompt and sys.stdin.isatty():
        entered = getpass.getpass(f"{what}: ")
        if confirm and getpass.getpass(f"{what} (again): ") != entered:
            raise ConfigurationError(f"the two {what} entries differ")
        if not entered:
            raise ConfigurationError(f"{what} must not be empty")
        return Secret(entered)
    raise ConfigurationError(
        f"no {what}: set {env_var}, give a file, or run in a terminal to be prompted"
    )


class SecretsProvider(ABC):
    """Turns a secret's name into its value; ``scheme`` is its prefix in references."""

    scheme: ClassVar[str]

    @abstractmethod
    def get(self, name: str) -> Secret:
        """The secret called ``name``; a missing one raises ConfigurationError."""

    def get_field(self, name: str, field: str | None) -> Secret:
        """One field of a JSON secret; providers without fields accept ``field=None`` only."""
        if field is not None:
            raise ConfigurationError(f"{self.scheme}: secrets have no fields (asked for {field!r})")
        return self.get(name)


class EnvSecrets(SecretsProvider):
    """Secrets from environment variables (``env:NAME``)."""

    scheme = "env"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def get(self, name: str) -> Secret:
        value = self._environ.get(name)
        if not value:
            raise ConfigurationError(f"environment variable {name} is not set or empty")
        return Secret(value)

    def __repr__(self) -> str:
        return "EnvSecrets()"


class FileSecrets(SecretsProvider):
    """Secrets from owner-only files (``file:/path``); relative names resolve under ``base``."""

    scheme = "file"

    def __init__(self, base: Path | None = None) -> None:
        self._base = base

    def get(self, name: str) -> Secret:
        path = Path(name).expanduser()
        if not path.is_absolute() and self._base is not None:
            path = self._base / path
        return read_secret_file(path)

    def __repr__(self) -> str:
        return f"FileSecrets(base={self._base!r})"


class _DropResponseBodies(logging.Filter):
    """Drops botocore's DEBUG dump of every response body, which holds secret values."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Response body"))


_DROP_RESPONSE_BODIES = _DropResponseBodies()


def hide_botocore_response_bodies() -> None:
    """Keep secrets out of DEBUG logs: botocore logs raw response bodies (SecretString,
    KMS plaintext) at DEBUG from ``botocore.parsers``. Idempotent, process-wide."""
    logger = logging.getLogger("botocore.parsers")
    if _DROP_RESPONSE_BODIES not in logger.filters:
        logger.addFilter(_DROP_RESPONSE_BODIES)


_AWS_NOT_FOUND = frozenset({"ResourceNotFoundException"})
_AWS_REFUSED = frozenset(
    {
        "AccessDeniedException",
        "DecryptionFailure",
        "InvalidParameterException",
        "InvalidRequestException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
    }
)


class AwsSecretsManager(SecretsProvider):
    """Secrets from AWS Secrets Manager (``aws-sm:secret-id`` or ``aws-sm:secret-id#field``).

    ``endpoint_url`` points it at any compatible endpoint (a VPC endpoint, moto in tests, or
    the host's outbound proxy inside an enclave). A secret stored as JSON can be narrowed to
    one field; SecretString and SecretBinary are both accepted.
    """

    scheme = "aws-sm"

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
        client: Any = None,
    ) -> None:
        self._region = region
        self._endpoint_url = endpoint_url
        self._timeouts = (connect_timeout, read_timeout, max_attempts)
        self._client = client

    def __repr__(self) -> str:
        return f"AwsSecretsManager(region={self._region!r}, endpoint_url={self._endpoint_url!r})"

    def _get_client(self) -> Any:
        hide_botocore_response_bodies()
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ConfigurationError(
                    "aws-sm secrets need boto3: pip install 'signd[aws]'"
                ) from None
            connect_timeout, read_timeout, max_attempts = self._timeouts
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
            )
            try:
                self._client = boto3.client(
                    "secretsmanager",
                    region_name=self._region,
                    endpoint_url=self._endpoint_url,
                    config=config,
                )
            except Exception as exc:  # botocore raises NoRegionError and friends here
                raise ConfigurationError(
                    f"cannot create a Secrets Manager client: {type(exc).__name__}"
                ) from None
        return self._client

    def get(self, name: str) -> Secret:
        secret_id, _, field = name.partition("#")
        return self.get_field(secret_id, field or None)

    def get_field(self, name: str, field: str | None) -> Secret:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if not name:
            raise ConfigurationError("aws-sm: a secret id is required")
        client = self._get_client()
        try:
            answer = client.get_secret_value(SecretId=name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _AWS_NOT_FOUND:
                raise ConfigurationError(
                    f"secret {name!r} does not exist in Secrets Manager"
                ) from None
            if code in _AWS_REFUSED:
                raise ConfigurationError(
                    f"Secrets Manager refused secret {name!r} ({code}); check the IAM policy "
                    "and the secret id"
                ) from None
            raise DependencyUnavailable(
                f"Secrets Manager failed to return secret {name!r} ({code or 'error'})"
            ) from None
        except NoCredentialsError:
            raise ConfigurationError("no AWS credentials to read Secrets Manager") from None
        except BotoCoreError as exc:
            raise DependencyUnavailable(
                f"Secrets Manager is unreachable ({type(exc).__name__})"
            ) from None
        log.info("fetched secret %r from Secrets Manager", name)  # safe: name only
        if "SecretString" in answer:
            value: str | bytes = answer["SecretString"]
        elif "SecretBinary" in answer:
            value = bytes(answer["SecretBinary"])
        else:
            raise ConfigurationError(f"secret {name!r} has no current value")
        return _select_field(Secret(value), name, field)


def _select_field(secret: Secret, name: str, field: str | None) -> Secret:
    """The whole secret, or one string field of it read as a JSON object."""
    if field is None:
        if not secret:
            raise ConfigurationError(f"secret {name!r} is empty")
        return secret
    try:
        document = json.loads(secret.reveal())
    except (ValueError, UnicodeDecodeError):
        raise ConfigurationError(
            f"secret {name!r} is not a JSON object, so it has no field {field!r}"
        ) from None
    if not isinstance(document, dict) or field not in document:
        raise ConfigurationError(f"secret {name!r} has no field {field!r}")
    value = document[field]
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"field {field!r} of secret {name!r} is not a non-empty string")
    return Secret(value)


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret lives: a provider scheme, a name, and optionally a JSON field."""

    provider: str
    name: str
    field: str | None = None

    def __str__(self) -> str:
        suffix = f"#{self.field}" if self.field else ""
        return f"{self.provider}:{self.name}{suffix}"


def parse_secret_ref(value: str | Mapping[str, Any]) -> SecretRef:
    """Parse ``env:NAME``, ``file:/path``, ``aws-sm:id#field`` or the table form."""
    if isinstance(value, Mapping):
        provider, name, field = value.get("provider"), value.get("name"), value.get("field")
        if not isinstance(provider, str) or not isinstance(name, str) or not name:
            raise ConfigurationError(
                "a secret reference table needs string 'provider' and 'name' keys"
            )
        if field is not None and not isinstance(field, str):
            raise ConfigurationError("a secret reference's 'field' must be a string")
        unknown = set(value) - {"provider", "name", "field"}
        if unknown:
            raise ConfigurationError(f"unknown keys in a secret reference: {sorted(unknown)}")
        return SecretRef(provider, name, field or None)
    if not isinstance(value, str):
        raise ConfigurationError("a secret reference must be a string or a table")
    provider, sep, rest = value.partition(":")
    if not sep or not rest:
        raise ConfigurationError(
            "a secret reference looks like env:NAME, file:/path or aws-sm:secret-id#field "
            "(secret values are never written into configuration)"
        )
    if provider == AwsSecretsManager.scheme:
        rest, _, field_text = rest.partition("#")
        return SecretRef(provider, rest, field_text or None)
    return SecretRef(provider, rest)


def default_providers(
    environ: Mapping[str, str] | None = None, aws: AwsSecretsManager | None = None
) -> dict[str, SecretsProvider]:
    """The built-in providers by scheme (Secrets Manager is only contacted when used)."""
    providers: list[SecretsProvider] = [
        EnvSecrets(environ),
        FileSecrets(),
        aws or AwsSecretsManager(),
    ]
    return {provider.scheme: provider for provider in providers}


def resolve_reference(
    value: str | Mapping[str, Any] | SecretRef,
    providers: Mapping[str, SecretsProvider] | None = None,
) -> Secret:
    """Fetch the secret a config value refers to."""
    ref = value if isinstance(value, SecretRef) else parse_secret_ref(value)
    known = providers if providers is not None else default_providers()
    provider = known.get(ref.provider)
    if provider is None:
        schemes = ", ".join(f"{scheme}:" for scheme in sorted(known))
        raise ConfigurationError(
            f"a secret reference must start with one of {schemes} (the prefix is not echoed, "
            "in case a secret value was written into configuration by mistake)"
        )
    return provider.get_field(ref.name, ref.field)
