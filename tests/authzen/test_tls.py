"""`bastion serve` terminates TLS itself: given a certificate and key it serves HTTPS only, and a
missing, unreadable, encrypted or mismatched file is a clear start error. The AuthZEN metadata
names the HTTPS URLs, or `public_url` when it is set."""

from __future__ import annotations

import socket
import ssl
import subprocess

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.authzen.conftest import EXAMPLE, HttpsServer, self_signed, serve_command, serve_env
from tests.server.conftest import free_port
from tests.waits import PATIENCE


def start_error(tmp_path, *flags: str, **env: str) -> str:
    """What `bastion serve` says when it refuses to start; it must refuse, with status 2."""
    done = subprocess.run(
        serve_command(str(tmp_path / "b.db"), free_port(), *flags),
        env=serve_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def test_a_missing_certificate_or_key_file_stops_the_start(tmp_path, certificate):
    missing = str(tmp_path / "nowhere.pem")
    said = start_error(tmp_path, "--tls-cert", missing, "--tls-key", str(certificate.key))
    assert "tls_certificate" in said and missing in said
    said = start_error(tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", missing)
    assert "tls_key" in said and missing in said


def test_a_certificate_without_its_key_stops_the_start(tmp_path, certificate):
    said = start_error(tmp_path, "--tls-cert", str(certificate.cert))
    assert "go together" in said
    said = start_error(tmp_path, BASTION_TLS_KEY=str(certificate.key))
    assert "go together" in said


def test_a_key_of_another_certificate_stops_the_start(tmp_path, certificate):
    other = self_signed(tmp_path, "other")
    said = start_error(tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", str(other.key))
    assert "do not make a TLS identity" in said
    # Not PEM at all.
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    said = start_error(tmp_path, "--tls-cert", str(junk), "--tls-key", str(other.key))
    assert "do not make a TLS identity" in said


def test_an_encrypted_key_stops_the_start_instead_of_asking_for_a_password(tmp_path, certificate):
    key = serialization.load_pem_private_key(certificate.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    said = start_error(tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", str(encrypted))
    assert "encrypted" in said


def test_a_public_url_that_is_not_https_stops_the_start(tmp_path):
    said = start_error(tmp_path, BASTION_PUBLIC_URL="http://pdp.example.com")
    assert "public_url" in said and "https" in said


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certificate):
    server = HttpsServer(
        tmp_path_factory.mktemp("tls"), EXAMPLE / "policy.polar", certificate
    ).start()
    yield server
    server.stop()


def test_it_serves_https_only(tls_server):
    with tls_server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
    # Plain HTTP on the same port gets no answer of the API.
    plain = f"http://127.0.0.1:{tls_server.port}/healthz"
    try:
        response = httpx.get(plain, timeout=5)
    except httpx.HTTPError:
        pass
    else:
        assert response.status_code == 400 and "ok" not in response.text


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_server):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.url}/healthz", verify=ssl.create_default_context(), timeout=5)


def test_the_metadata_uses_public_url_when_it_is_set(tmp_path, certificate):
    server = HttpsServer(
        tmp_path,
        EXAMPLE / "policy.polar",
        certificate,
        BASTION_PUBLIC_URL="https://pdp.example.com/",
    ).start()
    try:
        with server.client() as client:
            # A Host header of the client's choosing changes nothing.
            document = client.get(
                "/.well-known/authzen-configuration", headers={"host": "evil.example"}
            ).json()
    finally:
        server.stop()
    assert document["policy_decision_point"] == "https://pdp.example.com"
    assert document["access_evaluation_endpoint"] == "https://pdp.example.com/access/v1/evaluation"


def test_a_public_url_with_a_path_has_its_metadata_where_the_spec_derives_it(tmp_path, certificate):
    # The spec (and RFC 8615): the metadata of the PDP https://pdp.example.com/tenant1 is at
    # https://pdp.example.com/.well-known/authzen-configuration/tenant1, and its
    # policy_decision_point must be that identifier, or the PEP must not use it.
    server = HttpsServer(
        tmp_path,
        EXAMPLE / "policy.polar",
        certificate,
        BASTION_PUBLIC_URL="https://pdp.example.com/tenant1",
    ).start()
    try:
        with server.client() as client:
            found = client.get(
                "/.well-known/authzen-configuration/tenant1", headers={"x-request-id": "m-1"}
            )
            # Elsewhere there is no metadata of this PDP: a document there would name an
            # identifier that is not the one it was asked for.
            elsewhere = [
                client.get(f"/.well-known/authzen-configuration{path}")
                for path in ("", "/tenant2", "/tenant1/more")
            ]
    finally:
        server.stop()
    assert found.status_code == 200 and found.headers["x-request-id"] == "m-1"
    document = found.json()
    assert document["policy_decision_point"] == "https://pdp.example.com/tenant1"
    assert (
        document["access_evaluation_endpoint"]
        == "https://pdp.example.com/tenant1/access/v1/evaluation"
    )
    for response in elsewhere:
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("text/plain")
        assert "/.well-known/authzen-configuration/tenant1" in response.text


def test_a_body_past_its_limit_over_tls_gets_its_413_and_the_connection_ends(
    tls_server, certificate
):
    """TLS has no half-close: the close lingers without one (docs/security.md, "Lingering
    close"), and the client reads the 413 by its length, then the end of the connection."""
    context = ssl.create_default_context(cafile=str(certificate.cert))
    raw = socket.create_connection(("127.0.0.1", tls_server.port), timeout=PATIENCE)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(
            b"POST /v1/authorize HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 67108864\r\n\r\n" + b" " * (1 << 20)
        )
        received = b""
        while data := s.recv(65536):
            received += data
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"\r\nconnection: close" in head, received
    assert b"max_body_bytes" in body
