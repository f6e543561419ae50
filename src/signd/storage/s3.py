"""The S3 blob store (boto3), for several nodes sharing one bucket.

``put`` never overwrites: it sends ``If-None-Match: *`` (a conditional write, which S3 and
moto honour) and maps the 412 answer to KeyExists. An endpoint that answers 501 to that
header is remembered and written to with a HEAD then a PUT instead, which can race with a
concurrent writer of the same name. Every call is bounded by connect and read timeouts and a
small number of attempts, so an endpoint that is down or stuck raises DependencyUnavailable
within about ``timeout * max_attempts`` seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from signd.errors import DependencyUnavailable, KeyExists, KeyNotFound
from signd.storage.base import BlobStore, check_range
from signd.storage.blobs import check_blob_name

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "501"})


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3BlobStore(BlobStore):
    """Blobs as objects ``<prefix><name>`` in one S3 bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: S3Client | None = None,
        timeout: float = 5.0,
        max_attempts: int = 2,
        conditional_put: bool = True,
    ) -> None:
        """Use ``client`` as given (the caller closes it), or build one with these timeouts."""
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._conditional_put = conditional_put
        self._owns_client = client is None
        if client is None:
            config = Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"total_max_attempts": max_attempts, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint_url else None,
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        self._client = client

    def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        if not self._conditional_put:
            self._put_if_absent(name, key, bytes(data))
            return
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data), IfNoneMatch="*")
        except ClientError as exc:
            code = _error_code(exc)
            if code in _EXISTS_CODES:
                raise KeyExists(f"blob {name!r} already exists") from exc
            if code not in _UNSUPPORTED_CODES:
                raise self._unavailable(f"write blob {name!r}", exc) from exc
            self._conditional_put = False
            self._put_if_absent(name, key, bytes(data))
        except BotoCoreError as exc:
            raise self._unavailable(f"write blob {name!r}", exc) from exc

    def get(self, name: str) -> bytes:
        key = self._key(name)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise KeyNotFound(f"no blob {name!r}") from exc
            raise self._unavailable(f"read blob {name!r}", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(f"read blob {name!r}", exc) from exc

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        key = self._key(name)
        byte_range = f"bytes={offset}-{offset + length - 1}"
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key, Range=byte_range)
            data: bytes = response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES | {"InvalidRange", "416"}:
                raise KeyNotFound(f"no blob {name!r} with bytes {byte_range}") from exc
            raise self._unavailable(f"read blob {name!r}", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(f"read blob {name!r}", exc) from exc
        if len(data) != length:
            raise KeyNotFound(f"blob {name!r} has no bytes {offset}..{offset + length}")
        return data

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._call(f"delete blob {name!r}", self._client.delete_object, Bucket=self.bucket, Key=key)

    def check_health(self) -> None:
        self._call("reach the bucket", self._client.head_bucket, Bucket=self.bucket)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _key(self, name: str) -> str:
        return self.prefix + check_blob_name(name)

    def _put_if_absent(self, name: str, key: str, data: bytes) -> None:
        """HEAD then PUT, for endpoints without conditional writes."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES:
                raise self._unavailable(f"write blob {name!r}", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(f"write blob {name!r}", exc) from exc
        else:
            raise KeyExists(f"blob {name!r} already exists")
        self._call(
            f"write blob {name!r}", self._client.put_object, Bucket=self.bucket, Key=key, Body=data
        )

    def _call(self, action: str, method: Any, **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(action, exc) from exc

    def _unavailable(self, action: str, exc: ClientError | BotoCoreError) -> DependencyUnavailable:
        reason = (
            (_error_code(exc) or "error") if isinstance(exc, ClientError) else type(exc).__name__
        )
        return DependencyUnavailable(f"S3 bucket {self.bucket!r}: cannot {action}: {reason}")
