"""``signd kms-server`` (a local KMS speaking the AWS protocol) and ``signd kms policy``.

Registered in ``main.py`` with ``app.add_typer(kms_app)``: the commands join the top level.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from signd.cli.context import state
from signd.cli.output import handles_errors, stderr
from signd.config import default_home
from signd.errors import InvalidField

kms_app = typer.Typer(no_args_is_help=True)
kms_tools_app = typer.Typer(help="KMS helpers for real AWS deployments.", no_args_is_help=True)
kms_app.add_typer(kms_tools_app, name="kms")

PCR_HEX_SIZE = 96


@kms_app.command("kms-server")
@handles_errors
def kms_server(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port on 127.0.0.1 (0: any).")
    ] = 0,
    home: Annotated[
        Path | None, typer.Option("--home", help="Data directory (default: signd's home).")
    ] = None,
    region: Annotated[str, typer.Option(help="Region the server answers as.")] = "us-east-1",
    dev_ca: Annotated[
        Path | None,
        typer.Option(help="Development CA of the simulated NSM (default HOME/attestation/dev-ca)."),
    ] = None,
    trust_aws_root: Annotated[
        bool, typer.Option(help="Also accept documents from real Nitro Enclaves.")
    ] = False,
) -> None:
    """Serve a local KMS on 127.0.0.1 for boto3 (`endpoint_url`), with attestation policies.

    Writes HOME/kms-server.json (mode 0600): endpoint, region and the access key to sign with.
    """
    from signd.kms.server.http import create_server, serve_until_signalled

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    base = home or state.home or default_home()
    server, info = create_server(
        base, port=port, region=region, dev_ca_dir=dev_ca, trust_aws_root=trust_aws_root
    )
    stderr.print(f"kms-server listening on {info.endpoint} (details in {base / 'kms-server.json'})")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    serve_until_signalled(server, stop)


def _measurement(value: str, name: str) -> bytes:
    text = value.strip().removeprefix("0x").lower()
    if len(text) != PCR_HEX_SIZE:
        raise InvalidField(f"{name} must be {PCR_HEX_SIZE} hex digits (SHA-384)", field=name)
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidField(f"{name} must be hex", field=name) from None


PcrOption = Annotated[str | None, typer.Option(help="SHA-384 measurement, 96 hex digits.")]


@kms_tools_app.command("policy")
@handles_errors
def kms_policy(
    enclave_role: Annotated[
        str, typer.Option(help="ARN of the role the enclave's parent instance uses.")
    ],
    admin_principal: Annotated[
        str | None,
        typer.Option(help="ARN that administers the key (default: the account root)."),
    ] = None,
    pcr0: PcrOption = None,
    pcr1: PcrOption = None,
    pcr2: PcrOption = None,
    pcr3: PcrOption = None,
    pcr4: PcrOption = None,
    pcr8: PcrOption = None,
    image_sha384: PcrOption = None,
) -> None:
    """Print an AWS key policy that releases data keys only to an attested enclave."""
    from signd.kms.server.policy import attestation_key_policy

    given = {0: pcr0, 1: pcr1, 2: pcr2, 3: pcr3, 4: pcr4, 8: pcr8}
    pcrs = {i: _measurement(v, f"pcr{i}") for i, v in given.items() if v is not None}
    image = _measurement(image_sha384, "image_sha384") if image_sha384 is not None else None
    if not pcrs and image is None:
        raise InvalidField("give at least one of --pcr0.. or --image-sha384", field="pcr0")
    parts = enclave_role.split(":")
    if len(parts) < 6 or parts[:3] != ["arn", "aws", "iam"] or not parts[4].isdigit():
        raise InvalidField("enclave role must be an IAM ARN", field="enclave_role")
    admin = admin_principal or f"arn:aws:iam::{parts[4]}:root"
    policy = attestation_key_policy(
        enclave_principal=enclave_role, admin_principal=admin, pcrs=pcrs, image_sha384=image
    )
    sys.stdout.write(json.dumps(policy, indent=2) + "\n")
