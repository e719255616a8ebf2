"""A local S3 (moto's server) on a free loopback port, with a bucket of its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from backend.config import StorageSettings
from tests.support.procs import free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def settings(self, prefix: str = "studio/") -> StorageSettings:
        return StorageSettings(
            backend="s3",
            s3_endpoint_url=self.endpoint,
            s3_bucket=self.bucket,
            s3_region="us-east-1",
            s3_access_key_id=SecretStr("test-key"),
            s3_secret_access_key=SecretStr("test-secret"),
            s3_prefix=prefix,
            s3_addressing_style="path",
            s3_timeout_s=5,
        )

    def client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test-key",
            aws_secret_access_key="test-secret",
        )


@contextmanager
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, stopped afterwards."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3Server(f"http://127.0.0.1:{port}", f"studio-{uuid.uuid4().hex[:8]}")
        s3.client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.stop()
