"""A real `bastion serve` over HTTPS (a self-signed certificate made here with `cryptography`,
trusted by the client) holding the AuthZEN certification fixture (examples/authzen), and an
httpx client with a key of the scope ``authzen``."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bastion.facts.model import fact_to_json
from bastion.policy.parser import parse_fact
from tests import clients
from tests.server.conftest import ADMIN_KEY, free_port
from tests.waits import PATIENCE, until_ready

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "authzen"


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    def trust(self) -> ssl.SSLContext:
        """A client TLS context that trusts this certificate alone."""
        return ssl.create_default_context(cafile=str(self.cert))


def self_signed(directory: Path, name: str = "server") -> Certificate:
    """A certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bastion test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Certificate(directory / f"{name}.crt", directory / f"{name}.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def serve_command(database: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bastion.cli",
        "serve",
        "--database",
        database,
        "--port",
        str(port),
        *extra,
    ]


def serve_env(**more: str) -> dict[str, str]:
    return {
        **os.environ,
        "BASTION_ADMIN_KEY": ADMIN_KEY,
        "BASTION_CONFIG": "/nonexistent",
        "PYTHONPATH": str(ROOT),
        **more,
    }


class HttpsServer:
    """``bastion serve --tls-cert --tls-key`` on a free loopback port."""

    def __init__(self, tmp: Path, policy: Path, certificate: Certificate, **env: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.database = str(tmp / "bastion.db")
        self.policy = policy
        self.certificate = certificate
        self.env = env
        self.log = tmp / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> HttpsServer:
        cmd = serve_command(
            self.database,
            self.port,
            "--policy-file",
            str(self.policy),
            "--tls-cert",
            str(self.certificate.cert),
            "--tls-key",
            str(self.certificate.key),
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=serve_env(**self.env)
            )
        trust = self.certificate.trust()
        until_ready(self.proc, lambda: clients.ready(self.url, verify=trust), self.log)
        return self

    def client(self, key: str | None = None) -> httpx.Client:
        """A client that trusts this server's certificate (and nothing else)."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url=self.url, headers=headers, verify=self.certificate.trust(), timeout=30
        )

    def load_facts(self, path: Path) -> None:
        facts = [
            fact_to_json(parse_fact(line))
            for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        with self.client(ADMIN_KEY) as client:
            response = client.post("/v1/facts/batch", json={"insert": facts})
            assert response.status_code == 200, response.text

    def create_key(self, *scopes: str) -> str:
        with self.client(ADMIN_KEY) as client:
            response = client.post("/v1/keys", json={"name": "pep", "scopes": list(scopes)})
            assert response.status_code == 201, response.text
            return response.json()["key"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> Certificate:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def fixture_pdp(tmp_path_factory, certificate):
    """The certification fixture served over HTTPS, with a key of the scope authzen."""
    server = HttpsServer(
        tmp_path_factory.mktemp("authzen"), EXAMPLE / "policy.polar", certificate
    ).start()
    try:
        server.load_facts(EXAMPLE / "fixture.facts")
        server.key = server.create_key("authzen")
        yield server
    finally:
        server.stop()


@pytest.fixture
def pep(fixture_pdp):
    """An httpx client of the fixture PDP, as a PEP with an authzen key."""
    with fixture_pdp.client(fixture_pdp.key) as client:
        yield client
