"""Client ID metadata documents: fetched over https with limits, validated, cached, refused when
they lie about themselves or live on an address the server must not reach."""

from __future__ import annotations

import gzip
import html
import ipaddress
import json
import socket
import tracemalloc
from contextlib import contextmanager
from dataclasses import replace
from email.utils import formatdate
from urllib.parse import urlencode

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from bastion import egress
from bastion.egress import is_public_address, may_connect
from bastion.oauth import AuthorizationServer
from bastion.oauth.client_metadata_document import ClientMetadataDocuments
from bastion.oauth.errors import OAuthError
from bastion.oauth.settings import ClientMetadataDocumentSettings
from tests.waits import PATIENCE, eventually_async

from .support import (
    PASSWORD,
    Clock,
    TricklingHost,
    free_socket,
    hidden_fields,
    log_in_and_consent,
    pkce_pair,
    running_bastion,
    self_signed_certificate,
    serve,
)

REDIRECT = "http://127.0.0.1:9/callback"


@pytest.fixture
def host(tmp_path):
    """An https loopback server answering each path with the (status, body, headers) set for it."""
    with host_serving(tmp_path) as serving:
        yield serving


@contextmanager
def host_serving(tmp_path):
    """The `host` fixture, as a context manager."""
    cert, key = self_signed_certificate(tmp_path)
    sock = free_socket()
    base = f"https://127.0.0.1:{sock.getsockname()[1]}"
    answers: dict[str, tuple[int, bytes, dict]] = {}
    fetches: list[str] = []

    async def answer(request):
        fetches.append(request.url.path)
        status, body, headers = answers.get(request.url.path, (404, b"", {}))
        return Response(body, status_code=status, headers=headers, media_type="application/json")

    class Host:
        ca_file = cert

        def url(self, path: str) -> str:
            return f"{base}{path}"

        def document(self, path: str, headers: dict | None = None, **overrides) -> str:
            url = self.url(path)
            body = {
                "client_id": url,
                "client_name": "Doc agent",
                "redirect_uris": [REDIRECT],
                **overrides,
            }
            answers[path] = (
                200,
                json.dumps({k: v for k, v in body.items() if v is not None}).encode(),
                headers or {},
            )
            return url

        def raw(self, path: str, status: int, body: bytes, headers: dict | None = None) -> str:
            answers[path] = (status, body, headers or {})
            return self.url(path)

    Host.fetches = fetches
    app = Starlette(routes=[Route("/{path:path}", answer)])
    with serve(app, sock, ssl_certfile=cert, ssl_keyfile=key):
        yield Host()


def resolve(host, url: str, **settings) -> object:
    documents = ClientMetadataDocuments(
        ClientMetadataDocumentSettings(
            **{"allow_private_addresses": True, "ca_file": host.ca_file, **settings}
        ),
        Clock(),
    )
    return anyio.run(documents.client, url)


def refused(host, url: str, message: str, **settings) -> None:
    with pytest.raises(OAuthError, match=message) as caught:
        resolve(host, url, **settings)
    assert caught.value.error == "invalid_client"


def test_a_valid_document_describes_a_public_client(host):
    client = resolve(host, host.document("/agent.json"))
    assert client.client_name == "Doc agent"
    assert client.redirect_uris == (REDIRECT,)
    assert client.token_endpoint_auth_method == "none"
    assert client.source == "metadata_document"


def test_document_whose_client_id_differs_from_its_url_is_refused(host):
    url = host.document("/liar.json", client_id=host.url("/someone-else.json"))
    refused(host, url, "client_id must equal")


def test_document_with_a_secret_is_refused(host):
    refused(host, host.document("/secret.json", client_secret="s3cret"), "client_secret")


def test_document_with_a_confidential_auth_method_is_refused(host):
    url = host.document("/jwt.json", token_endpoint_auth_method="private_key_jwt")
    refused(host, url, "token_endpoint_auth_method")


def test_document_with_bad_redirect_uris_is_refused(host):
    refused(host, host.document("/none.json", redirect_uris=[]), "redirect_uris")
    refused(host, host.document("/http.json", redirect_uris=["http://example.com/cb"]), "https")


def test_document_whose_grant_types_are_not_text_is_refused(host):
    """A grant type that is a list or an object was put in a set (unhashable): a 500 at
    /authorize, and, not a refusal, never remembered as a failure (fetched again each time)."""
    for odd in ([["authorization_code"]], [{"a": 1}], ["password"]):
        refused(host, host.document("/grants.json", grant_types=odd), "grant_types must be")


def test_oversized_document_is_refused(host):
    url = host.raw("/big.json", 200, b'{"client_id": "' + b"x" * 10_000 + b'"}')
    refused(host, url, "larger than", max_bytes=5120)


def test_redirects_are_not_followed(host):
    target = host.document("/real.json")
    url = host.raw("/moved.json", 302, b"", {"location": target})
    refused(host, url, "HTTP 302")


def test_a_compressed_document_is_refused_before_it_is_inflated(host):
    # 273 bytes on the wire, "gzip, gzip": httpx inflated them to 64 MiB in one call (141 MiB
    # held) before the size bound saw a byte; a layer more reaches gigabytes.
    body = gzip.compress(gzip.compress(b" " * (64 << 20), 9), 9)
    url = host.raw("/bomb.json", 200, body, {"content-encoding": "gzip, gzip"})
    tracemalloc.start()
    try:
        refused(host, url, "compressed")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak >> 20} MiB held while refusing {len(body)} bytes"


def test_non_json_and_missing_documents_are_refused(host):
    refused(host, host.raw("/text.json", 200, b"hello"), "not JSON")
    refused(host, host.url("/missing.json"), "HTTP 404")
    # Within max_bytes, nested past Python's recursion limit: refused, not a RecursionError.
    refused(host, host.raw("/deep.json", 200, b"[" * 2500 + b"]" * 2500), "not JSON")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/html", "application/octet-stream", "application/jsonp", "json", ""],
)
def test_a_document_not_served_as_json_is_refused(host, content_type):
    """A file anyone may upload to a host (a paste, an attachment) is served as text or bytes,
    and its host's name is what the consent page shows: the draft (§4) has a document served
    as ``application/json`` (or ``application/<AS-defined>+json``), every other content type an
    error."""
    url = host.url(f"/uploads/{len(content_type)}.txt")
    body = {"client_id": url, "client_name": "Doc agent", "redirect_uris": [REDIRECT]}
    host.raw(
        url.removeprefix(host.url("")),
        200,
        json.dumps(body).encode(),
        {"content-type": content_type},
    )
    refused(host, url, "content type")


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "Application/JSON; charset=utf-8", "application/client-metadata+json"],
)
def test_a_document_served_as_json_is_taken(host, content_type):
    url = host.url("/agent.json")
    body = {"client_id": url, "client_name": "Doc agent", "redirect_uris": [REDIRECT]}
    host.raw("/agent.json", 200, json.dumps(body).encode(), {"content-type": content_type})
    assert resolve(host, url).client_id == url


def test_urls_that_cannot_be_client_ids_are_refused(host):
    refused(host, host.url("/"), "must have a path")
    refused(host, host.url("/a/../b.json"), "dot segments")
    refused(host, host.url("/agent.json") + "#frag", "fragment")


def test_a_host_spelt_with_its_trailing_dot_is_refused_before_any_fetch(host):
    """``localhost.`` is ``localhost`` (a fully qualified name, RFC 1034 §3.1) spelt another way:
    a second client_id for the same document, each with limits of its own per host."""
    url = host.url("/agent.json").replace("127.0.0.1", "localhost.")
    body = {"client_id": url, "client_name": "Doc agent", "redirect_uris": [REDIRECT]}
    host.raw("/agent.json", 200, json.dumps(body).encode())
    refused(host, url, "trailing dot")
    assert host.fetches == []


@pytest.mark.parametrize("userinfo", ["@", ":@", "%20@"])
def test_an_empty_user_information_is_user_information_too(host, userinfo):
    """``https://@host/agent.json`` has user information, empty (RFC 3986 §3.2.1), which the
    draft (§3) forbids: it was fetched and taken, a second client_id for one document URL."""
    url = host.url("/agent.json").replace("https://", f"https://{userinfo}")
    body = {"client_id": url, "client_name": "Doc agent", "redirect_uris": [REDIRECT]}
    host.raw("/agent.json", 200, json.dumps(body).encode())
    refused(host, url, "user information")
    assert host.fetches == []


@pytest.mark.parametrize(
    "path",
    [
        "/official/%2e%2e/users/evil/agent.json",
        "/official/%2E%2E/users/evil/agent.json",
        "/official/.%2e/users/evil/agent.json",
        "/official/%2e/agent.json",
        "/official%2f..%2fusers/evil/agent.json",
        "/official/..%5cusers/evil/agent.json",
        "/official/..;x=1/users/evil/agent.json",
        "/official/%252e%252e/users/evil/agent.json",
    ],
)
def test_dot_segments_in_another_spelling_are_refused_before_any_fetch(host, path):
    """``%2e%2e`` is ``..`` spelt another way (RFC 3986 §2.3, §6.2.2.2), and so, to the servers
    that read them so, are ``..%2f``, ``..%5c`` (a backslash) and ``..;x`` (a path parameter):
    the host received ``/official/../users/evil/agent.json`` and, resolving it as servers do,
    served a document any user of it could have written under ``/users/evil/``, as the client
    of ``/official/``."""
    url = host.url(path)
    body = {"client_id": url, "client_name": "Official agent", "redirect_uris": [REDIRECT]}
    for served in ("/official/../users/evil/agent.json", "/official/./agent.json", path):
        host.raw(served, 200, json.dumps(body).encode())
    refused(host, url, "dot segments")
    assert host.fetches == []


def test_loopback_and_private_addresses_are_refused_by_default(host):
    url = host.document("/agent.json")
    host.fetches.clear()
    refused(host, url, "non-public address", allow_private_addresses=False)
    assert host.fetches == []


def test_untrusted_certificate_is_refused(host):
    url = host.document("/agent.json")
    with pytest.raises(OAuthError, match="could not be fetched"):
        anyio.run(
            ClientMetadataDocuments(
                ClientMetadataDocumentSettings(allow_private_addresses=True), Clock()
            ).client,
            url,
        )


def test_authorize_with_a_lying_document_shows_an_error_page_and_changes_nothing(
    host, sqlite_url, tmp_path
):
    url = host.document("/liar.json", client_id=host.url("/other.json"))
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        before = bastion.rows()
        _, challenge = pkce_pair()
        params = bastion.authorize_params(
            {"client_id": url, "redirect_uris": [REDIRECT]}, challenge
        )
        response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
        assert response.status_code == 400 and "location" not in response.headers
        assert "client_id must equal" in response.text
        assert bastion.rows() == before


def test_a_document_without_a_client_name_is_refused_and_changes_nothing(
    host, sqlite_url, tmp_path
):
    """MCP authorization (2025-11-25 §4.2.1, 2026-07-28 Client Registration §1.1): "The metadata
    document MUST include at least the following properties: client_id, client_name,
    redirect_uris", and the authorization server "MUST validate the document structure is valid
    JSON and contains required fields". A nameless one was taken, shown by its host."""
    url = host.document("/nameless.json", client_name=None)
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        before = bastion.rows()
        _, challenge = pkce_pair()
        params = bastion.authorize_params(
            {"client_id": url, "redirect_uris": [REDIRECT]}, challenge
        )
        response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
        assert response.status_code == 400 and "location" not in response.headers
        assert "invalid_client" in response.text and "client_name is required" in response.text
        assert bastion.rows() == before
    refused(host, host.document("/blank.json", client_name="  "), "client_name is required")


def test_a_document_naming_a_member_twice_is_refused_and_changes_nothing(
    host, sqlite_url, tmp_path
):
    """A document that names ``client_id`` (another client's URL, then its own) or
    ``redirect_uris`` (an attacker's, then the client's) twice: which client it describes, or
    where a code goes, depends on the parser that reads it (I-JSON, RFC 7493 §2.3). Refused at
    /authorize as invalid_client naming the member, with an error page and nothing stored."""
    first = {
        "client_id": host.url("/someone-else.json"),
        "redirect_uris": ["https://evil.example/cb"],
    }
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        for member, value in first.items():
            path = f"/twice-{member}.json"
            url = host.url(path)
            document = {"client_id": url, "client_name": "Doc agent", "redirect_uris": [REDIRECT]}
            # The member with ``value``, then again with the document's own: a reader that
            # keeps the last (Python's json) takes the document as the client's.
            written = json.dumps({**document, member: value})[:-1]
            again = f", {json.dumps(member)}: {json.dumps(document[member])}}}"
            host.raw(path, 200, (written + again).encode())
            before = bastion.rows()
            _, challenge = pkce_pair()
            params = bastion.authorize_params(
                {"client_id": url, "redirect_uris": [REDIRECT]}, challenge
            )
            response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
            assert response.status_code == 400 and "location" not in response.headers, member
            text = html.unescape(response.text)
            assert "invalid_client" in text and f"member '{member}' twice" in text, text
            assert bastion.rows() == before


def test_an_error_for_a_document_client_is_shown_not_redirected(host, sqlite_url, tmp_path):
    """Anyone can publish a document naming any redirect URI: bastion does not send a browser
    there on its own for an error found before the person did anything (RFC 9700 §4.11.2)."""
    url = host.document("/agent.json")
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        _, challenge = pkce_pair()
        params = bastion.authorize_params(
            {"client_id": url, "redirect_uris": [REDIRECT]}, challenge, response_type="token"
        )
        response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
        assert response.status_code == 400 and "location" not in response.headers
        assert "unsupported_response_type" in response.text and "127.0.0.1:9" in response.text


def test_a_document_client_is_refused_once_documents_are_turned_off(host, sqlite_url, tmp_path):
    """``enabled = false`` is the operator's way to stop clients named by a URL: the copy kept
    of a document seen before (for admins to list and revoke) is no client then. It was: that
    copy, never fetched again, went on starting authorizations and refreshing tokens."""
    url = host.document("/agent.json", grant_types=["authorization_code", "refresh_token"])
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        client = {"client_id": url, "redirect_uris": [REDIRECT]}
        tokens = bastion.tokens_for(client)
        assert "refresh_token" in tokens
        off = replace(
            bastion.server.settings,
            client_metadata=replace(bastion.server.settings.client_metadata, enabled=False),
        )
        restarted = AuthorizationServer(off, bastion.db, clock=bastion.clock)
        host.fetches.clear()
        with serve(Starlette(routes=restarted.routes()), free_socket()) as base:
            _, challenge = pkce_pair()
            params = urlencode(bastion.authorize_params(client, challenge))
            page = bastion.http.get(f"{base}/authorize?{params}")
            refresh = bastion.http.post(
                f"{base}/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": tokens["refresh_token"],
                    "client_id": url,
                },
            )
        assert page.status_code == 400 and "location" not in page.headers, page.text
        assert "client ID metadata documents are turned off" in page.text
        assert refresh.status_code == 401, refresh.text
        assert refresh.json()["error"] == "invalid_client"
        assert host.fetches == []


def test_revoked_document_client_stays_refused(host, sqlite_url, tmp_path):
    url = host.document("/agent.json")
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        client = {"client_id": url, "redirect_uris": [REDIRECT]}
        bastion.code_for(client)
        assert bastion.server.store.revoke_client(url, bastion.clock(), actor="test")
        _, challenge = pkce_pair()
        response = bastion.http.get(
            f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
        )
        assert response.status_code == 400 and "revoked" in response.text


def test_document_with_a_redirect_uri_outside_rfc_3986_is_refused(host):
    for number, uri in enumerate(["http://127.0.0.1:9/cb\n", "https://example.com/c b"]):
        url = host.document(f"/bad-{number}.json", redirect_uris=[uri])
        refused(host, url, "RFC 3986")


# Private, loopback, link-local, shared, reserved and special IPv4 ranges (a sample of each).
PRIVATE_IPV4 = [
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "127.0.0.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "192.0.0.1",
    "198.18.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
]
PUBLIC_IPV4 = "8.8.8.8"


def _forms(inner: str, public: str = PUBLIC_IPV4) -> dict[str, ipaddress.IPv6Address]:
    """Every IPv6 form that leads to the IPv4 address ``inner``."""
    v4, other = int(ipaddress.IPv4Address(inner)), int(ipaddress.IPv4Address(public))
    return {
        "ipv4-mapped": ipaddress.IPv6Address((0xFFFF << 32) | v4),
        "ipv4-compatible": ipaddress.IPv6Address(v4),
        "nat64": ipaddress.IPv6Address((0x64FF9B << 96) | v4),
        "6to4": ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | 1),
        "teredo-server": ipaddress.IPv6Address(
            (0x20010000 << 96) | (v4 << 64) | (~other & 0xFFFFFFFF)
        ),
        "teredo-client": ipaddress.IPv6Address(
            (0x20010000 << 96) | (other << 64) | (~v4 & 0xFFFFFFFF)
        ),
    }


@pytest.mark.parametrize("inner", PRIVATE_IPV4)
@pytest.mark.parametrize(
    "form",
    ["ipv4", "ipv4-mapped", "ipv4-compatible", "nat64", "6to4", "teredo-server", "teredo-client"],
)
def test_a_private_ipv4_address_is_not_public_in_any_ipv6_wrapping(inner, form):
    address = ipaddress.IPv4Address(inner) if form == "ipv4" else _forms(inner)[form]
    assert not is_public_address(address), address


@pytest.mark.parametrize(
    "form", ["ipv4-mapped", "ipv4-compatible", "nat64", "6to4", "teredo-server", "teredo-client"]
)
def test_a_public_ipv4_address_stays_public_when_wrapped(form):
    assert is_public_address(_forms(PUBLIC_IPV4)[form])


@pytest.mark.parametrize(
    "address", ["64:ff9b:1::808:808", "64:ff9b:1::a00:1", "::", "::1", "fe80::1"]
)
def test_the_local_use_nat64_prefix_and_ipv6_specials_are_not_public(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "fec0::1",  # site-local (RFC 3879: deprecated, still routed inside some networks)
        "::ffff:0:a9fe:a9fe",  # IPv4-translated (RFC 2765 SIIT): 169.254.169.254
        "::ffff:0:7f00:1",  # the same for 127.0.0.1
        "5f00::1",  # SRv6 segment identifiers (RFC 9602)
        "4000::1",  # unassigned
    ],
)
def test_an_ipv6_address_outside_global_unicast_is_not_public(address):
    """Only 2000::/3 is global unicast (RFC 4291 §2.4; IANA's IPv6 address space): an
    address elsewhere reaches no one on the internet, and may reach the operator's network."""
    assert not is_public_address(ipaddress.ip_address(address))
    assert not may_connect(ipaddress.ip_address(address))
    assert is_public_address(ipaddress.ip_address("2606:4700::1111"))


@pytest.mark.parametrize("form", ["ipv4-mapped", "nat64", "6to4", "teredo-client"])
def test_a_document_on_a_wrapped_loopback_address_is_not_fetched(form):
    url = f"https://[{_forms('127.0.0.1')[form]}]:1/agent.json"
    documents = ClientMetadataDocuments(ClientMetadataDocumentSettings(), Clock())
    with pytest.raises(OAuthError, match="non-public address"):
        anyio.run(documents.client, url)


@pytest.fixture
def trickling(tmp_path):
    hosts: list[TricklingHost] = []

    def start(pad: int | None, interval: float) -> TricklingHost:
        hosts.append(TricklingHost(tmp_path, pad, interval, REDIRECT))
        return hosts[-1]

    yield start
    for host in hosts:
        host.close()


def documents_for(host, clock=None, **settings) -> ClientMetadataDocuments:
    return ClientMetadataDocuments(
        ClientMetadataDocumentSettings(
            **{"allow_private_addresses": True, "ca_file": host.ca_file, **settings}
        ),
        clock or Clock(),
    )


def test_a_document_whose_headers_trickle_in_is_refused_at_one_deadline_for_the_whole_fetch(
    trickling,
):
    # A byte a tenth of a second apart: no read waits a second, and the document is held back
    # until bastion has given up, however slow the machine (sixty bytes, six seconds, were a
    # margin a late deadline could overrun). Without the one deadline, it comes after PATIENCE.
    host = trickling(pad=None, interval=0.1)
    documents = documents_for(host, timeout_seconds=1)
    with pytest.raises(OAuthError, match="could not be fetched within 1 s"):
        anyio.run(documents.client, host.url("/slow.json"))


def _while_one_fetch_trickles(host, documents, second: str) -> str:
    """Why ``second`` is refused while a fetch from ``host`` trickles on ("" if it is not)."""
    outcome = {"second": ""}

    async def main() -> None:
        async def first() -> None:
            with pytest.raises(OAuthError):
                await documents.client(host.url("/first.json"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first)
            assert await eventually_async(lambda: host.accepted >= 1, every=0.01), (
                "the first fetch never reached the host"
            )
            try:
                await documents.client(second)
            except OAuthError as error:
                outcome["second"] = error.description
            tasks.cancel_scope.cancel()

    anyio.run(main)
    return outcome["second"]


# The first fetch trickles on until the second is refused, however slow the machine: with 3 s,
# a test task run late found the first fetch's deadline passed and its place free.
IN_PROGRESS = int(PATIENCE)


def test_a_host_gets_a_bounded_number_of_fetches_in_progress(trickling):
    host = trickling(pad=None, interval=0.1)
    documents = documents_for(host, timeout_seconds=IN_PROGRESS, max_concurrent_fetches_per_host=1)
    assert "in progress" in _while_one_fetch_trickles(host, documents, host.url("/second.json"))
    assert host.accepted == 1


def test_all_hosts_together_get_a_bounded_number_of_fetches_in_progress(trickling):
    """Names under one wildcard DNS record are as many hosts as their owner likes: the bound on
    all fetches in progress holds where the bound per host does not."""
    host = trickling(pad=None, interval=0.1)
    documents = documents_for(host, timeout_seconds=IN_PROGRESS, max_concurrent_fetches=1)
    other = host.url("/second.json").replace("127.0.0.1", "localhost")
    why = _while_one_fetch_trickles(host, documents, other)
    assert "1 client metadata document fetch(es) in progress" in why
    assert host.accepted == 1


def test_a_failing_url_is_not_fetched_again_until_its_failure_is_forgotten(host):
    clock = Clock()
    documents = documents_for(host, clock, failure_cache_seconds=30)
    url = host.raw("/flaky.json", 500, b"")
    host.fetches.clear()
    for _ in range(3):
        with pytest.raises(OAuthError, match="HTTP 500"):
            anyio.run(documents.client, url)
    assert host.fetches == ["/flaky.json"]
    host.document("/flaky.json")
    with pytest.raises(OAuthError, match="HTTP 500"):
        anyio.run(documents.client, url)
    clock.advance(31)
    assert anyio.run(documents.client, url).client_name == "Doc agent"
    assert host.fetches == ["/flaky.json", "/flaky.json"]


def test_a_host_gets_a_bounded_number_of_documents(host):
    clock = Clock()
    documents = documents_for(host, clock, max_documents_per_host=2, cache_seconds=300)
    first, second, third = (host.document(f"/agent-{n}.json") for n in range(3))
    anyio.run(documents.client, first)
    anyio.run(documents.client, second)
    host.fetches.clear()
    with pytest.raises(OAuthError, match="at most 2 per host"):
        anyio.run(documents.client, third)
    assert host.fetches == []
    assert anyio.run(documents.client, first).client_id == first  # from the cache
    clock.advance(301)
    assert anyio.run(documents.client, third).client_id == third


OTHER_REDIRECT = "http://127.0.0.1:9/other-callback"


def test_a_changed_document_is_fetched_again_once_its_max_age_has_passed(host):
    """MCP authorization (2025-11-25, Client ID Metadata Documents): servers "SHOULD cache
    metadata documents respecting HTTP cache headers". A redirect URI the client removed was
    honoured for ``cache_seconds`` (300 s) whatever the document's max-age said."""
    clock = Clock()
    documents = documents_for(host, clock, cache_seconds=300, min_cache_seconds=5)
    fresh = {"Cache-Control": "max-age=60"}
    url = host.document("/agent.json", fresh, redirect_uris=[REDIRECT, OTHER_REDIRECT])
    host.fetches.clear()
    assert anyio.run(documents.client, url).redirect_uris == (REDIRECT, OTHER_REDIRECT)
    host.document("/agent.json", fresh, redirect_uris=[REDIRECT])
    clock.advance(50)
    assert anyio.run(documents.client, url).redirect_uris == (REDIRECT, OTHER_REDIRECT)
    assert host.fetches == ["/agent.json"]
    clock.advance(11)
    assert anyio.run(documents.client, url).redirect_uris == (REDIRECT,)
    assert host.fetches == ["/agent.json", "/agent.json"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Cache-Control": "no-store"},
        {"Cache-Control": "no-cache"},
        {"Cache-Control": "max-age=0"},
        {"Expires": "0"},
    ],
)
def test_a_document_not_to_be_kept_is_still_kept_min_cache_seconds(host, headers):
    """Whoever serves the document chooses its headers: no-store must not turn every request
    naming it into a fetch from this server. It is kept ``min_cache_seconds``, and no longer."""
    clock = Clock()
    documents = documents_for(host, clock, cache_seconds=300, min_cache_seconds=5)
    url = host.document("/agent.json", headers)
    host.fetches.clear()
    for _ in range(3):
        anyio.run(documents.client, url)
    assert host.fetches == ["/agent.json"]
    clock.advance(6)
    anyio.run(documents.client, url)
    assert host.fetches == ["/agent.json", "/agent.json"]


def test_a_max_age_past_cache_seconds_is_cut_to_it(host):
    clock = Clock()
    documents = documents_for(host, clock, cache_seconds=300, min_cache_seconds=5)
    url = host.document("/agent.json", {"Cache-Control": "max-age=86400"})
    host.fetches.clear()
    anyio.run(documents.client, url)
    host.document("/agent.json", redirect_uris=[OTHER_REDIRECT])
    clock.advance(299)
    assert anyio.run(documents.client, url).redirect_uris == (REDIRECT,)
    clock.advance(2)
    assert anyio.run(documents.client, url).redirect_uris == (OTHER_REDIRECT,)
    assert host.fetches == ["/agent.json", "/agent.json"]


def test_a_document_is_kept_until_its_expires_date(host):
    """``Expires`` less the answer's ``Date`` (uvicorn sends one), without a max-age."""
    clock = Clock()
    documents = documents_for(host, clock, cache_seconds=300, min_cache_seconds=5)
    expires = {"Expires": formatdate(clock() + 60, usegmt=True)}
    url = host.document("/agent.json", expires)
    host.fetches.clear()
    anyio.run(documents.client, url)
    host.document("/agent.json", expires, redirect_uris=[OTHER_REDIRECT])
    clock.advance(30)
    assert anyio.run(documents.client, url).redirect_uris == (REDIRECT,)
    clock.advance(40)
    assert anyio.run(documents.client, url).redirect_uris == (OTHER_REDIRECT,)
    assert host.fetches == ["/agent.json", "/agent.json"]


def test_a_redirect_uri_removed_from_the_document_is_refused_at_authorize_after_its_max_age(
    host, sqlite_url, tmp_path
):
    fresh = {"Cache-Control": "max-age=60"}
    url = host.document("/agent.json", fresh, redirect_uris=[REDIRECT, OTHER_REDIRECT])
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        client = {"client_id": url, "redirect_uris": [OTHER_REDIRECT]}
        _, challenge = pkce_pair()
        authorize = (
            f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
        )
        assert bastion.http.get(authorize).status_code == 200
        host.document("/agent.json", fresh, redirect_uris=[REDIRECT])
        bastion.clock.advance(61)
        response = bastion.http.get(authorize)
        assert response.status_code == 400 and "location" not in response.headers
        assert "redirect_uri" in response.text
        assert bastion.server.store.client(url).redirect_uris == (REDIRECT,)


def test_the_consent_page_shows_the_documents_host_and_calls_the_client_unverified(
    host, sqlite_url, tmp_path
):
    url = host.document("/agent.json", client_name="Claude Desktop (example)")
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        _, challenge = pkce_pair()
        params = bastion.authorize_params(
            {"client_id": url, "redirect_uris": [REDIRECT]}, challenge
        )
        browser = httpx.Client(timeout=PATIENCE)
        login = browser.get(f"{bastion.url}/authorize?{urlencode(params)}")
        consent = browser.post(
            f"{bastion.url}/authorize/login",
            data={**hidden_fields(login.text), "username": "alice", "password": PASSWORD},
        )
        assert consent.status_code == 200
        for page in (login.text, consent.text):
            assert "Unverified application from <span class=host>127.0.0.1</span>" in page
            assert "a document published at <strong>127.0.0.1</strong>" in page
            assert (
                "&ldquo;Claude Desktop (example)&rdquo;, is whatever 127.0.0.1 wrote there" in page
            )


def test_a_document_clients_consent_is_remembered_only_at_a_claimed_https_redirect(
    host, sqlite_url, tmp_path
):
    """A metadata document's client is public: at its loopback redirect URI any program on the
    device could listen and take the code (RFC 8252 §8.6), so the person is asked each time;
    at its https one the consent is remembered, for that URI."""
    claimed = "https://agent.example/callback"
    url = host.document("/agent.json", redirect_uris=[REDIRECT, claimed])
    settings = {"allow_private_addresses": True, "ca_file": host.ca_file}
    with running_bastion(sqlite_url, tmp_path, client_metadata=settings) as bastion:
        browser = httpx.Client(timeout=PATIENCE)

        def authorization(redirect_uri: str) -> str:
            _, challenge = pkce_pair()
            client = {"client_id": url, "redirect_uris": [redirect_uri]}
            params = bastion.authorize_params(client, challenge)
            return f"{bastion.url}/authorize?{urlencode(params)}"

        for redirect_uri in (REDIRECT, claimed):
            allowed = log_in_and_consent(
                bastion.url, authorization(redirect_uri), "alice", PASSWORD, browser
            )
            assert "code=" in allowed.headers["location"]
        again = browser.get(authorization(REDIRECT))
        assert again.status_code == 200, again.headers.get("location")
        assert "/authorize/consent" in again.text
        assert "code=" in browser.get(authorization(claimed)).headers["location"]


def test_a_name_that_rebinds_to_loopback_after_the_check_is_not_connected_to(monkeypatch):
    # DNS rebinding: the name resolves to a public address when it is checked, then to the
    # loopback when it is resolved again. The fetch connects to the address it checked.
    # A connection to the loopback waits in the listener's backlog (the kernel completes it
    # unaccepted), and is looked for once the fetch has ended: however slow the machine, one
    # made is found, where a thread accepting until the fetch ended could be too late for it.
    listener = free_socket()
    listener.listen(8)
    port = listener.getsockname()[1]
    answers = iter(["1.1.1.1"])  # then the loopback, for ever
    real = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        if host in ("rebind.test", b"rebind.test"):
            address = next(answers, "127.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    documents = ClientMetadataDocuments(ClientMetadataDocumentSettings(timeout_seconds=2), Clock())
    try:
        with pytest.raises(OAuthError):
            anyio.run(documents.client, f"https://rebind.test:{port}/agent.json")
        listener.setblocking(False)
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            connection = None
    finally:
        listener.close()
    assert connection is None, "the fetch connected to the rebound (loopback) address"


def test_a_checked_address_is_fetched_by_its_name(tmp_path, monkeypatch):
    # The connection goes to the address that was checked; the request and TLS are still the
    # name's: the Host header names it, and the certificate is verified for it (this one is
    # for doc.test alone, not for the address).
    cert, key = self_signed_certificate(tmp_path, dns_name="doc.test")
    sock = free_socket()
    port = sock.getsockname()[1]
    url = f"https://doc.test:{port}/agent.json"
    hosts: list[str] = []

    async def answer(request):
        hosts.append(request.headers["host"])
        body = {"client_id": url, "client_name": "Doc agent", "redirect_uris": [REDIRECT]}
        return Response(json.dumps(body), media_type="application/json")

    real = socket.getaddrinfo

    def resolving(host, *args, **kwargs):
        if host in ("doc.test", b"doc.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolving)
    loopback = ipaddress.ip_address("127.0.0.1")
    monkeypatch.setattr(
        egress,
        "is_public_address",
        lambda address: address == loopback,  # here, the loopback stands for a public host
    )
    app = Starlette(routes=[Route("/{path:path}", answer)])
    with serve(app, sock, ssl_certfile=cert, ssl_keyfile=key):
        documents = ClientMetadataDocuments(ClientMetadataDocumentSettings(ca_file=cert), Clock())
        client = anyio.run(documents.client, url)
    assert client.client_name == "Doc agent"
    assert hosts == [f"doc.test:{port}"]


@pytest.mark.parametrize(
    "url",
    [
        # "аpple.com" with a Cyrillic а: shown on the consent page as the client's host, it
        # would read as apple.com. A URI is ASCII (RFC 3986); the host in punycode gives it away.
        "https://\u0430pple.com/agent.json",
        "https://example.com/agent\u202e.json",
        "https://example.com/a gent.json",
    ],
)
def test_a_document_url_outside_rfc_3986_is_refused_before_any_fetch(url):
    documents = ClientMetadataDocuments(ClientMetadataDocumentSettings(), Clock())
    with pytest.raises(OAuthError, match="RFC 3986") as caught:
        anyio.run(documents.client, url)
    assert caught.value.error == "invalid_client"


@pytest.mark.parametrize("host_part", ["0177.0.0.1", "127.000.000.001", "256.1.1.1"])
def test_a_client_id_whose_host_no_request_can_go_to_is_refused_not_an_error(
    host_part, sqlite_url, tmp_path
):
    # An IPv4 address with a leading zero (octal to some resolvers) or beyond 255: httpx
    # refuses to parse it, and /authorize answered 500 to anyone who named it.
    with running_bastion(sqlite_url, tmp_path) as bastion:
        _, challenge = pkce_pair()
        client = {"client_id": f"https://{host_part}/agent.json", "redirect_uris": [REDIRECT]}
        params = bastion.authorize_params(client, challenge)
        response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
    assert response.status_code == 400, response.text
    assert "not a valid URL" in response.text


def test_a_document_whose_name_holds_control_characters_is_refused(host):
    refused(host, host.document("/rlo.json", client_name="Claude\u202eDesktop"), "client_name")


def test_a_document_whose_name_reads_as_another_is_refused(host):
    """``Сlaude`` with a Cyrillic С reads as Claude on the consent page."""
    url = host.document("/cyrillic.json", client_name="\u0421laude")
    refused(host, url, "client_name mixes scripts in one word")
