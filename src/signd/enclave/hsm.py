"""HSM custody served by the enclave: the PKCS#11 token lives here, the metadata on the host.

With ``[hsm] in_enclave = true``, ``signd enclave`` loads the PKCS#11 module and fetches the
PIN itself (on Nitro from Secrets Manager, through the outbound proxy like every other
dependency); the host never sees either. The host asks for keys and signatures over the
enclave protocol (``custody: "hsm"``) and records what comes back, exactly as for sealed keys.

The token is connected at start-up, and again on demand while it is unreachable (at most every
``retry_interval`` seconds, failing fast in between), so an HSM outage or a bad HSM setting
shows up as that error on HSM requests while sealed-key custody keeps working. A refused PIN is
never tried again by this process (CloudHSM locks a crypto user after a few failed logins):
fix the PIN and restart the enclave.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from signd.chains import address_deriver
from signd.crypto.secp256k1 import check_digest
from signd.custody.hsm.library import PinRefused
from signd.custody.hsm.token import HsmToken
from signd.enclave.protocol import MAX_BATCH, CreatedHsmKey, HsmKeyReference
from signd.enclave.signer import AddressFunction
from signd.errors import InvalidField, SigndError

logger = logging.getLogger(__name__)


class EnclaveHsm:
    """Creates keys on the token and signs with them; ``connect`` opens (and logs in to) it."""

    def __init__(
        self,
        connect: Callable[[], HsmToken],
        *,
        address_deriver: Callable[[str], AddressFunction] = address_deriver,
        max_batch: int = MAX_BATCH,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._address_deriver = address_deriver
        self.max_batch = max_batch
        self._retry_interval = retry_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._token: HsmToken | None = None
        self._failure: SigndError | None = None
        self._retry_at = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"EnclaveHsm({self._token!r})"

    def start(self) -> None:
        """Connect now so that problems are logged at start-up; a failure is not fatal."""
        try:
            self.token()
        except SigndError:
            return

    def token(self) -> HsmToken:
        """The connected token, connecting first if needed; the last failure while it is fresh."""
        with self._lock:
            if self._token is not None:
                return self._token
            if self._closed:
                raise SigndError("the enclave's HSM custody is closed")
            failure = self._failure
            if failure is not None and (
                isinstance(failure, PinRefused) or self._clock() < self._retry_at
            ):
                raise type(failure)(failure.message, field=failure.field)
            try:
                self._token = self._connect()
            except SigndError as error:
                self._failure, self._retry_at = error, self._clock() + self._retry_interval
                logger.error("HSM custody is unavailable: %s (%s)", error.message, error.code)
                raise
            self._failure = None
            logger.info("HSM custody connected: %r", self._token)
            return self._token

    def create_keys(self, chain: str, count: int) -> tuple[list[CreatedHsmKey], SigndError | None]:
        """Generate ``count`` keys; the keys made before a failure come back with the failure.

        The host records those and then raises the error, as a host-side HSM backend does: a
        token that runs out of memory keeps the keys it made.
        """
        address_of = self._address_deriver(chain)
        if isinstance(count, bool) or not 1 <= count <= self.max_batch:
            raise InvalidField(f"count must be 1..{self.max_batch}", field="count")
        token = self.token()
        created: list[CreatedHsmKey] = []
        for _ in range(count):
            key_id = uuid.uuid4().hex
            try:
                key = token.generate_key(key_id)
            except SigndError as error:
                if not created:
                    raise
                return created, error
            address = address_of(key.public_key)
            created.append(
                CreatedHsmKey(key_id, chain, address, key.public_key, key.cka_id, key.label)
            )
        return created, None

    def sign_digest(self, key: HsmKeyReference, digest: bytes) -> bytes:
        """The token's raw r‖s over a 32-byte digest (the host normalises and checks it)."""
        return self.token().sign(key.cka_id, check_digest(digest))

    def check_health(self) -> None:
        self.token().check_health()

    def close(self) -> None:
        with self._lock:
            token, self._token, self._closed = self._token, None, True
        if token is not None:
            token.close()
