"""``signd kms-server``: a local KMS that speaks the AWS KMS protocol to an unmodified boto3.

- :mod:`~signd.kms.server.http`: the HTTP server (127.0.0.1, JSON 1.1, SigV4) and the helpers
  that start it in a thread or a child process;
- :mod:`~signd.kms.server.service`: the operations, sans I/O;
- :mod:`~signd.kms.server.policy`: key policies with ``kms:RecipientAttestation`` conditions;
- :mod:`~signd.kms.cms` (shared with the enclave): ``CiphertextForRecipient`` as CMS
  EnvelopedData;
- :mod:`~signd.kms.server.sigv4`: request signature verification;
- :mod:`~signd.kms.server.store`: keys on disk, sealed under a key-encryption key.
"""

from signd.kms.cms import open_for_recipient, seal_for_recipient
from signd.kms.server.http import (
    INFO_FILE,
    MAX_BODY_SIZE,
    RunningServer,
    ServerInfo,
    create_server,
    start_kms_server,
    start_kms_server_process,
)
from signd.kms.server.policy import KeyPolicy, attestation_key_policy

__all__ = [
    "INFO_FILE",
    "MAX_BODY_SIZE",
    "KeyPolicy",
    "RunningServer",
    "ServerInfo",
    "attestation_key_policy",
    "create_server",
    "open_for_recipient",
    "seal_for_recipient",
    "start_kms_server",
    "start_kms_server_process",
]
