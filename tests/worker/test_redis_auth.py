"""Redis with a password and an ACL user, and over TLS (rediss://), set in the URL."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from api_tasks import BrokerUnavailable
from api_tasks.client import Client
from config.loader import load_settings
from tests.support.services import RedisServer, WorkerProcess, free_port, redis_binary

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


def _round_trip(env: dict[str, str], workdir: Path, model: str) -> WorkerProcess:
    worker = WorkerProcess(env, workdir / f"{model}.log", concurrency=4, name=model).start()
    try:
        client = Client(load_settings(env=env))
        response = client.submit_chat(USER, model=model).result(timeout=30)
        assert response is not None
    finally:
        worker.stop()
    return worker


def test_acl_user_and_password(worker_env: dict[str, str], workdir: Path, model: str) -> None:
    port = free_port()
    url = f"redis://jobs:s3cret-jobs-pw@127.0.0.1:{port}/0"
    server = RedisServer(workdir / f"acl-{model}", port=port, url=url, args=(
        "--requirepass", "admin-pw", "--user", "jobs", "on", ">s3cret-jobs-pw", "~*", "&*",
        "+@all")).start()
    try:
        env = {**worker_env, "REDIS_URL": url}
        worker = _round_trip(env, workdir, model)
        assert "s3cret-jobs-pw" not in worker.log()
        wrong = load_settings(env={**env, "REDIS_URL": url.replace("s3cret", "wrong")})
        with pytest.raises(BrokerUnavailable):
            Client(wrong).submit_chat(USER, model=model)
    finally:
        server.stop()


def _certificates(where: Path) -> tuple[Path, Path, Path]:
    where.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (where / n for n in ("ca.key", "ca.crt", "r.key", "r.csr",
                                                      "r.crt"))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca), "-days", "2", "-subj", "/CN=test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-copy_extensions", "copy")
    return ca, cert, key


def _has_tls() -> bool:
    binary = redis_binary()
    linked = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    return shutil.which("openssl") is not None and "libssl" in linked


@pytest.mark.skipif(not _has_tls(), reason="this redis-server has no TLS support")
def test_tls_with_rediss_url(worker_env: dict[str, str], workdir: Path, model: str) -> None:
    ca, cert, key = _certificates(workdir / f"tls-{uuid.uuid4().hex[:6]}")
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    server = RedisServer(workdir / f"tls-{model}", port=free_port(), url=url, args=(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients",
        "no")).start()
    try:
        _round_trip({**worker_env, "REDIS_URL": url}, workdir, model)
    finally:
        server.stop()
