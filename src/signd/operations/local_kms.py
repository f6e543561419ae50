"""The embedded default KMS: a ``signd kms-server`` process under the signd home.

With no ``[kms]`` configured, the enclave's KMS is a kms-server reached through boto3 like AWS
KMS, in recipient mode when attestation is on. Lifecycle:

- **started on first use**: nothing happens until the first KMS call (a key created, a cold
  sign, a health check). Then, holding ``$HOME/kms-server.lock``, the client reads
  ``$HOME/kms-server.json``; if a kms-server is there (:func:`answers`: its ``Server``
  header, or a connection accepted by one that is stuck) it is **reused** (another process
  started it, or ``signd kms-server`` runs by hand), otherwise a new one is started
  (``python -m signd.kms.server --home HOME --exit-with-parent``, port chosen by the kernel)
  and this process **owns** it. Every KMS answer must carry that header too: once a
  kms-server dies, another program may listen on its port, and its answers are not KMS
  answers (503, then a new kms-server);
- **stopped** by :meth:`EmbeddedKms.close` when this process owns it, and in any case when
  its owner dies (``--exit-with-parent``); a client that was reusing a server which then went
  away starts a new one on its next call (one retry), so several processes sharing a home
  keep working whichever of them exits first;
- the **key** is found by alias: ``alias/signd-enclave`` when attestation is on, created on
  first run with a key policy that pins the PCR0 the enclave's own attestation document reports
  (for the simulated NSM, :func:`signd.attestation.measure` of the enclave code): trust on
  first use, the code that first runs is the code the key is bound to, and any later change
  to the measured code makes KMS refuse its data keys until the operator re-pins the policy
  (``signd kms repin``, after a deliberate upgrade); ``alias/signd-enclave-unattested`` (no
  conditions) when ``[enclave] attestation = "off"``. Data keys under one cannot be unwrapped
  under the other.

kms-server state (its KEK, keys, credentials) lives in ``$HOME/kms-server/``; see docs/KMS.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from signd.attestation.document import AttestationDocument, CoseSign1
from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, DependencyUnavailable
from signd.kms.aws import AwsKms
from signd.kms.base import DataKey, KmsClient
from signd.kms.recipient import Recipient
from signd.kms.server import INFO_FILE, ServerInfo, attestation_key_policy
from signd.kms.server.http import (
    DEFAULT_ACCOUNT,
    RunningServer,
    answers,
    from_kms_server,
    start_kms_server_process,
)

logger = logging.getLogger(__name__)

LOCK_FILE: Final = "kms-server.lock"
ATTESTED_ALIAS: Final = "alias/signd-enclave"
UNATTESTED_ALIAS: Final = "alias/signd-enclave-unattested"
STARTUP_TIMEOUT: Final = 30.0
_ACCOUNT_ROOT: Final = f"arn:aws:iam::{DEFAULT_ACCOUNT}:root"
_BOTO_CONFIG: Final = Config(
    connect_timeout=2.0, read_timeout=5.0, retries={"total_max_attempts": 1, "mode": "standard"}
)
"""A read timeout well below the host's default wait for the enclave (15 s, with a blob read
before it), so that a stuck kms-server fails the enclave's call as KMS unavailable before the
host gives up on the enclave."""


class LocalKmsServer:
    """The home's kms-server: reused when it answers, otherwise started and owned."""

    def __init__(self, home: Path, *, startup_timeout: float = STARTUP_TIMEOUT) -> None:
        self.home = Path(home)
        self._startup_timeout = startup_timeout
        self._owned: RunningServer | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalKmsServer(home={str(self.home)!r}, owned={self._owned is not None})"

    @property
    def owned(self) -> bool:
        return self._owned is not None

    def ensure(self) -> ServerInfo:
        """A server that accepts connections now: the recorded one, or a new one."""
        with self._lock, home_lock(self.home):
            info = self._recorded()
            if info is not None and answers(info.endpoint):
                return info
            self._stop_owned()
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            logger.info("starting the embedded kms-server under %s", self.home)
            self._owned = start_kms_server_process(
                self.home, timeout=self._startup_timeout, extra_args=["--exit-with-parent"]
            )
            return self._owned.info

    def serves(self, endpoint: str | None) -> bool:
        """Whether the home's recorded kms-server is at ``endpoint`` and accepts connections."""
        info = self._recorded()
        return info is not None and info.endpoint == endpoint and answers(info.endpoint)

    def _recorded(self) -> ServerInfo | None:
        if not (self.home / INFO_FILE).exists():
            return None
        try:
            return ServerInfo.read(self.home)
        except ConfigurationError:
            return None

    def _stop_owned(self) -> None:
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.stop()

    def stop(self) -> None:
        """Stop the server if this process started it (a reused one is left running)."""
        with self._lock:
            self._stop_owned()


@contextlib.contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Exclusive across processes: the home's kms-server start and its key's creation or
    re-pinning (``signd kms repin``). Not re-entrant: do not nest it."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(home / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def attested_key_policy(pcr0: bytes) -> str:
    """The policy of ``alias/signd-enclave``: data keys only to an enclave reporting ``pcr0``.

    Created with it on first run; ``signd kms repin`` puts it again with a new PCR0.
    """
    policy = attestation_key_policy(
        enclave_principal=_ACCOUNT_ROOT, admin_principal=_ACCOUNT_ROOT, pcrs={0: pcr0}
    )
    return json.dumps(policy)


def ensure_data_key_alias(client: Any, *, pcr0: bytes | None) -> str:
    """The alias of the home's data-key master key, creating key and alias on first run.

    With ``pcr0`` the key policy releases data keys only to a ``Recipient`` whose attestation
    document reports that PCR0; without it the key has the default policy. Call it holding the
    home lock, so two first runs do not create two keys.
    """
    alias = ATTESTED_ALIAS if pcr0 is not None else UNATTESTED_ALIAS
    try:
        client.describe_key(KeyId=alias)
        return alias
    except client.exceptions.NotFoundException:
        pass
    options: dict[str, Any] = {}
    if pcr0 is not None:
        options["Policy"] = attested_key_policy(pcr0)
    created = client.create_key(
        KeySpec="SYMMETRIC_DEFAULT",
        KeyUsage="ENCRYPT_DECRYPT",
        Description="signd enclave data keys (embedded kms-server)",
        **options,
    )
    client.create_alias(AliasName=alias, TargetKeyId=created["KeyMetadata"]["KeyId"])
    logger.info("created the embedded KMS key %s", alias)
    return alias


def _only_kms_server_answers(endpoint: str) -> Callable[..., None]:
    """A botocore ``after-call`` hook: an answer without the kms-server's ``Server`` header
    came from another program on the port of a kms-server that stopped."""

    def check(http_response: Any, **_: Any) -> None:
        if not from_kms_server(http_response.headers.get("Server")):
            raise DependencyUnavailable(
                f"embedded kms-server: something other than a kms-server answers at {endpoint}"
            )

    return check


class EmbeddedKms(KmsClient):
    """The enclave's KMS by default: AwsKms against the home's kms-server (see module doc).

    ``recipient`` puts the client in recipient mode and a new key under a policy pinning the
    PCR0 of ``recipient``'s attestation document.
    """

    kms_type = "kms-server"

    def __init__(
        self,
        home: Path,
        *,
        recipient: Recipient | None,
        server: LocalKmsServer | None = None,
    ) -> None:
        self._server = server if server is not None else LocalKmsServer(home)
        self._recipient = recipient
        self._inner: AwsKms | None = None
        self._endpoint: str | None = None
        """The kms-server ``_inner`` talks to."""
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        mode = "recipient" if self._recipient is not None else "plain"
        return f"EmbeddedKms(home={str(self._server.home)!r}, {mode})"

    @property
    def server(self) -> LocalKmsServer:
        return self._server

    def _connect(self) -> AwsKms:
        info = self._server.ensure()
        self._endpoint = info.endpoint
        client = info.client(config=_BOTO_CONFIG)
        client.meta.events.register("after-call.kms", _only_kms_server_answers(info.endpoint))
        pcr0 = None
        if self._recipient is not None:
            document = CoseSign1.decode(self._recipient.document())
            pcr0 = AttestationDocument.decode(document.payload).pcrs[0]
        try:
            with home_lock(self._server.home):
                alias = ensure_data_key_alias(client, pcr0=pcr0)
        except (BotoCoreError, ClientError) as exc:
            client.close()
            raise DependencyUnavailable(
                f"embedded kms-server: cannot prepare its key: {type(exc).__name__}"
            ) from None
        except DependencyUnavailable:
            client.close()
            raise
        return AwsKms(alias, client=client, recipient=self._recipient)

    def _client(self, *, fresh: bool = False) -> AwsKms:
        with self._lock:
            if fresh and self._inner is not None:
                self._inner.close()
                self._inner = None
            if self._inner is None:
                self._inner = self._connect()
            return self._inner

    def _call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._client(), operation)(*args, **kwargs)
        except DependencyUnavailable:
            if self._server.serves(self._endpoint):
                raise  # it is there but failing or slow: asking again would double the wait
            # the server this client reused may have stopped with its owner: find or start one
            return getattr(self._client(fresh=True), operation)(*args, **kwargs)

    def generate_data_key(self, *, encryption_context: Mapping[str, str] | None = None) -> DataKey:
        result: DataKey = self._call("generate_data_key", encryption_context=encryption_context)
        return result

    def decrypt(
        self, ciphertext: bytes, *, encryption_context: Mapping[str, str] | None = None
    ) -> Secret:
        result: Secret = self._call("decrypt", ciphertext, encryption_context=encryption_context)
        return result

    def check_health(self) -> None:
        self._call("check_health")

    def close(self) -> None:
        with self._lock:
            if self._inner is not None:
                self._inner.close()
                self._inner = None
        self._server.stop()
