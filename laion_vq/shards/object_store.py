"""Object-store faults, ridden out. A 10,000-shard backfill makes hundreds of thousands of S3 requests: some get a
500 InternalError, a 503 SlowDown, a reset connection or no answer at all. botocore's retry policy (exponential
backoff with full jitter, a retry quota, optionally client-side rate limiting) retries each request; it is
configured here, once, for every S3 client of the platform: s3fs through `storage.filesystem`, polars' object store
through `s3_client_config` (`removals/plan.py`). A fault that outlasts the attempts becomes
StorageUnavailableError naming the URL, the fault and the attempts. Nothing partial is left: an object PUT is
whole or absent, and a multipart upload's parts are no object until it completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: retry mode and attempts when neither the laion_vq setting nor AWS_RETRY_MODE / AWS_MAX_ATTEMPTS is set
DEFAULT_S3_RETRY_MODE = "standard"
DEFAULT_S3_MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class S3ClientConfig:
    """How every S3 request is retried and timed out (from `laion_vq.settings`)."""

    retry_mode: str
    max_attempts: int
    connect_timeout: float
    read_timeout: float


def s3_client_config() -> S3ClientConfig:
    """The S3 retry policy and timeouts, read now: LAION_VQ_S3_* when set, else AWS_RETRY_MODE / AWS_MAX_ATTEMPTS
    (what an AWS deployment may already set for every SDK), else the defaults above."""
    from laion_vq import settings

    mode = settings.S3_RETRY_MODE.get() or os.environ.get("AWS_RETRY_MODE") or DEFAULT_S3_RETRY_MODE
    if mode not in ("standard", "adaptive", "legacy"):
        raise ValueError(f"AWS_RETRY_MODE must be standard, adaptive or legacy, got {mode!r}")
    attempts = settings.S3_MAX_ATTEMPTS.get()
    if attempts is None:
        aws = os.environ.get("AWS_MAX_ATTEMPTS")
        try:
            attempts = int(aws) if aws else DEFAULT_S3_MAX_ATTEMPTS
        except ValueError:
            raise ValueError(f"AWS_MAX_ATTEMPTS must be an integer, got {aws!r}") from None
    if attempts < 1:
        raise ValueError(f"{settings.S3_MAX_ATTEMPTS.env} must be at least 1 (the first attempt), got {attempts}")
    return S3ClientConfig(
        retry_mode=mode,
        max_attempts=attempts,
        connect_timeout=settings.S3_CONNECT_TIMEOUT.get_float(),
        read_timeout=settings.S3_READ_TIMEOUT.get_float(),
    )


def s3_storage_options() -> dict[str, Any]:
    """s3fs's options for every S3 filesystem: botocore's `Config` (retries and timeouts) through `config_kwargs`."""
    config = s3_client_config()
    return {
        "config_kwargs": {
            "retries": {"mode": config.retry_mode, "total_max_attempts": config.max_attempts},
            "connect_timeout": config.connect_timeout,
            "read_timeout": config.read_timeout,
        }
    }


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


class StorageUnavailableError(OSError):
    """An object-store request that failed on every attempt: `url`, `fault` (S3's error code, or what the
    connection did) and `attempts`. An OSError (EIO), so code catching OSError still catches it."""

    def __init__(self, url: str, fault: str, attempts: int, detail: str = "", policy: str = "") -> None:
        self.url, self.fault, self.attempts, self.detail, self.policy = url, fault, attempts, detail, policy
        super().__init__(errno.EIO, f"{url}: {fault} after {attempts} attempts")

    def __reduce__(self) -> tuple:  # picklable across processes (Celery, multiprocessing) with its fields
        return type(self), (self.url, self.fault, self.attempts, self.detail, self.policy)

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        policy = f" [{self.policy}]" if self.policy else ""
        return f"{self.url}: {self.fault} after {self.attempts} attempts{detail}{policy}"


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


#: error codes botocore treats as throttling (retried whatever their status)
_THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)


def storage_fault(err: BaseException) -> tuple[str, int | None] | None:
    """(fault, attempts made) when `err` comes from an S3 request botocore gave up retrying (attempts None when
    botocore does not record them: connection errors); None for anything else (a missing object, a bug)."""
    from botocore.exceptions import (  # type: ignore[import-untyped]
        ClientError,
        HTTPClientError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    for cause in _causes(err):
        if isinstance(cause, ClientError):
            meta = cause.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode") or 0)
            code = str(cause.response.get("Error", {}).get("Code") or "")
            if status < 500 and code not in _THROTTLING_CODES:
                return None
            fault = code if code and not code.isdigit() else f"HTTP {status}"
            return fault, int(meta.get("RetryAttempts", 0)) + 1
        if isinstance(cause, BotoConnectionError | HTTPClientError):
            name = type(cause).__name__
            return f"{_CONNECTION_FAULTS.get(name, 'connection error')} ({name})", None
    return None


#: what botocore's connection-level errors mean, in words (aiobotocore reports a reset connection as
#: EndpointConnectionError, a connection closed without an answer as ConnectionClosedError)
_CONNECTION_FAULTS = {
    "ReadTimeoutError": "no answer within the read timeout",
    "ConnectTimeoutError": "no connection within the connect timeout",
    "ConnectionClosedError": "connection closed without an answer",
    "EndpointConnectionError": "connection reset or refused",
}


@contextlib.contextmanager
def storage_faults_named(url: str) -> Iterator[None]:
    """Inside: an object-store fault that outlasted botocore's retries becomes StorageUnavailableError naming `url`,
    the fault and the attempts; any other error (FileNotFoundError for a missing object) passes unchanged."""
    try:
        yield
    except StorageUnavailableError:
        raise
    except Exception as err:
        if not is_s3(url):
            raise
        found = storage_fault(err)
        if found is None:
            raise
        fault, attempts = found
        config = s3_client_config()
        policy = (
            f"{config.retry_mode} retries, LAION_VQ_S3_MAX_ATTEMPTS={config.max_attempts}, "
            f"LAION_VQ_S3_READ_TIMEOUT={config.read_timeout:g}s"
        )
        raise StorageUnavailableError(url, fault, attempts or config.max_attempts, str(err), policy) from err
