"""The connections' rows on SQLite and PostgreSQL, and the ``auth = "per_user"`` settings: bad
input is refused with a message naming the key, and changes nothing. Also what bastion refuses
from an upstream's authorization server (metadata of another issuer, a token not Bearer)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from starlette.applications import Starlette

from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection, StoredFlow
from bastion.connections.upstream_oauth import (
    MAX_EXPIRES_IN,
    MAX_ISSUER,
    ServerMetadata,
    UpstreamOAuthClient,
    UpstreamOAuthError,
)
from bastion.db import Database
from bastion.gateway.config import GatewayConfig
from bastion.oauth.jwks import CoalescedFetches
from bastion.server.config import ConfigError
from tests.connections.fakes import AuthorizationServer, ResourceMetadata, loopback_base
from tests.oauth.support import free_socket, serve
from tests.waits import eventually_async


@pytest.fixture
def store(database_url):
    db = Database(database_url)  # a fresh file, or a fresh PostgreSQL schema
    yield ConnectionStore(db)
    db.close()


def test_a_connection_is_kept_replaced_and_deleted_per_user_and_upstream(store):
    first = StoredConnection("alice", "tracker", "sealed-1", "issues:read", 100.0, 1.0, 1.0)
    store.put(first)
    store.put(StoredConnection("bob", "tracker", "sealed-b", "", 100.0, 1.0, 1.0))
    store.put(StoredConnection("alice", "tracker", "sealed-2", "issues:read", 200.0, 1.0, 2.0))
    assert store.get("alice", "tracker").sealed == "sealed-2"
    assert [c.subject for c in store.listed(upstream="tracker")] == ["alice", "bob"]
    second = store.get("alice", "tracker")
    third = StoredConnection("alice", "tracker", "sealed-3", "issues:read", 300.0, 1.0, 3.0)
    assert store.replace(second, third)
    assert not store.replace(second, replace(third, sealed="sealed-4"))  # moved on
    assert store.get("alice", "tracker") == third
    assert store.delete("alice", "tracker", "sealed-2") is None  # only the row holding it
    assert store.delete("alice", "tracker").sealed == "sealed-3"
    assert store.get("alice", "tracker") is None and store.delete("alice", "tracker") is None
    assert store.get("bob", "tracker") is not None


def test_a_flow_state_is_taken_once_and_old_flows_are_forgotten(store):
    store.add_flow(StoredFlow("old", "alice", "tracker", "v", 10.0), older_than=0.0)
    store.add_flow(StoredFlow("new", "alice", "tracker", "v", 1000.0), older_than=500.0)
    assert store.take_flow("old") is None  # forgotten as the new one started
    assert store.take_flow("new").subject == "alice"
    assert store.take_flow("new") is None


def test_the_first_registration_with_an_authorization_server_is_kept(store):
    assert store.add_client("tracker", "https://as", "first") == "first"
    assert store.add_client("tracker", "https://as", "second") == "first"
    assert store.client("tracker", "https://as") == "first"


def _gateway(**upstream):
    return GatewayConfig.from_mapping(
        {"upstreams": [{"name": "tracker", "url": "https://t.example/mcp", **upstream}]}, env={}
    )


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ({"auth": "everyone"}, 'auth must be "none" or "per_user"'),
        (
            {"auth": "per_user", "headers": {"Authorization": "Bearer x"}},
            "may not set Authorization",
        ),
        ({"auth": "per_user", "oauth": {"issuer": "ftp://as"}}, "oauth.issuer"),
        ({"auth": "per_user", "oauth": {"scope": ["a"]}}, "unknown key"),
        ({"auth": "per_user", "oauth": {"scopes": ["a b"]}}, "oauth.scopes"),
        ({"auth": "per_user", "oauth": {"client_secret": "s"}}, "needs"),
        ({"auth": "per_user", "oauth": {"refresh_ahead_seconds": 0}}, "refresh_ahead_seconds"),
        ({"auth": "per_user", "oauth": {"flow_seconds": float("inf")}}, "flow_seconds"),
        ({"auth": "per_user", "oauth": "yes"}, "must be a table"),
        (
            {"auth": "per_user", "oauth": {"allow_private_addresses": "yes"}},
            r"oauth.allow_private_addresses: true, false or a list of networks",
        ),
        ({"oauth": {}}, 'only with auth = "per_user"'),
        ({"auth": "per_user", "oauth": {"metadata_cache_seconds": 0}}, "metadata_cache_seconds"),
        ({"auth": "per_user", "oauth": {"metadata_stale_seconds": -1}}, "metadata_stale_seconds"),
        ({"auth": "per_user", "oauth": {"metadata_stale_seconds": True}}, "metadata_stale_sec"),
    ],
)
def test_bad_per_user_settings_are_refused_with_the_key_named(upstream, message):
    with pytest.raises(ConfigError, match=message):
        _gateway(**upstream)


def test_a_per_user_upstream_must_be_http():
    with pytest.raises(ConfigError, match="needs a url"):
        GatewayConfig.from_mapping(
            {"upstreams": [{"name": "t", "command": "python", "auth": "per_user"}]}, env={}
        )


def test_the_connections_commands_name_the_file_that_has_no_per_user_upstream(tmp_path, capsys):
    from bastion.cli import main

    config = tmp_path / "deploy.toml"
    config.write_text(
        '[oauth]\nissuer = "http://127.0.0.1:9"\nkey_dir = "keys"\n'
        '[[oauth.resources]]\nuri = "http://127.0.0.1:9/mcp/desk"\n'
        '[gateway]\n[[gateway.upstreams]]\nname = "desk"\nurl = "http://127.0.0.1:9/mcp"\n'
    )
    assert main(["connections", "list", "--config", str(config)]) == 2
    assert f'{config} has no upstream with auth = "per_user"' in capsys.readouterr().err


def test_per_user_settings_have_defaults_and_read_the_secret_from_the_environment():
    config = GatewayConfig.from_mapping(
        {
            "upstreams": [
                {
                    "name": "tracker",
                    "url": "https://t.example/mcp",
                    "auth": "per_user",
                    "oauth": {"client_id": "bastion", "client_secret": "${SECRET}"},
                }
            ]
        },
        env={"SECRET": "s3"},
    )
    oauth = config.upstream("tracker").oauth
    assert oauth.client_secret == "s3" and "s3" not in repr(oauth)
    assert (oauth.refresh_ahead_seconds, oauth.flow_seconds, oauth.issuer) == (60, 600, "")
    assert (oauth.metadata_cache_seconds, oauth.metadata_stale_seconds) == (3600, 86400)
    never = _gateway(auth="per_user", oauth={"metadata_stale_seconds": 0}).upstream("tracker")
    assert never.oauth.metadata_stale_seconds == 0
    assert _gateway().upstream("tracker").auth == "none"


def test_per_user_seconds_keep_their_fractions():
    timing = {"refresh_ahead_seconds": 0.5, "flow_seconds": 90.5, "timeout_seconds": 2.5}
    oauth = _gateway(auth="per_user", oauth=timing).upstream("tracker").oauth
    assert (oauth.refresh_ahead_seconds, oauth.flow_seconds, oauth.timeout_seconds) == (
        0.5,
        90.5,
        2.5,
    )


def test_per_user_credentials_go_on_upstream_sessions_of_one_user_never_a_shared_one():
    assert _gateway(auth="per_user").upstream("tracker").session == "per_user"
    mine = _gateway(auth="per_user", session="per_client_session").upstream("tracker")
    assert mine.session == "per_client_session"
    with pytest.raises(ConfigError, match='needs session = "per_user"') as refused:
        _gateway(auth="per_user", session="shared")
    assert "cannot carry each user's own token" in str(refused.value)
    assert _gateway().upstream("tracker").session == "shared"


def _service(tmp_path, cache_seconds: float, clock):
    from cryptography.fernet import Fernet

    from bastion.connections.sealing import Sealer
    from bastion.connections.service import Connections
    from bastion.connections.settings import UpstreamOAuth

    store = ConnectionStore(Database(str(tmp_path / "cache.db")))
    # Port 9 on loopback: nothing answers there (revocation upstream fails at once, and is logged).
    upstreams = {"tracker": ("http://127.0.0.1:9/mcp", UpstreamOAuth(cache_seconds=cache_seconds))}
    return Connections(store, Sealer([Fernet.generate_key()]), upstreams, "https://b", clock=clock)


def _connect(service, token: str) -> None:
    sealed = service.sealer.seal("alice", "tracker", {"access_token": token, "refresh_token": ""})
    service.store.put(StoredConnection("alice", "tracker", sealed, "", 10_000.0, 0.0, 0.0))


def test_without_a_cache_each_call_reads_the_connection_again(tmp_path):
    import anyio

    service = _service(tmp_path, 0, lambda: 1000.0)
    _connect(service, "a1")
    assert anyio.run(service.access_token, "alice", "tracker") == "a1"
    _connect(service, "a2")  # as another replica would
    assert anyio.run(service.access_token, "alice", "tracker") == "a2"
    service.store.delete("alice", "tracker")  # as the CLI would
    assert anyio.run(service.access_token, "alice", "tracker") is None


def test_with_cache_seconds_a_token_is_reused_that_long_and_a_revocation_here_applies_at_once(
    tmp_path,
):
    import anyio

    now = [1000.0]
    service = _service(tmp_path, 5, lambda: now[0])
    _connect(service, "a1")
    assert anyio.run(service.access_token, "alice", "tracker") == "a1"
    _connect(service, "a2")  # another process's change is seen after cache_seconds
    assert anyio.run(service.access_token, "alice", "tracker") == "a1"
    now[0] += 5
    assert anyio.run(service.access_token, "alice", "tracker") == "a2"
    assert anyio.run(lambda: service.revoke("alice", "tracker", actor="test"))
    assert anyio.run(service.access_token, "alice", "tracker") is None
    service.store.db.close()


def test_an_authorization_server_named_by_an_upstream_must_be_a_url_an_index_takes():
    """The authorization server an upstream's metadata names is stored with the client bastion
    registers there, in an indexed column: PostgreSQL indexes no entry over 2,704 bytes, so one
    of 3,000 characters was a 500 (after a client was registered there, at every try). Neither
    it nor a name that is no https URL is used; one at the bound is."""
    sock = free_socket()
    upstream = loopback_base(sock)
    resource = ResourceMetadata(upstream)  # naming the server each try sets
    server = AuthorizationServer(base=upstream, under_paths=True)  # naming the issuer asked
    app = Starlette(routes=[*resource.routes(), *server.routes()])
    at_the_bound = f"{upstream}/as/" + "a" * (MAX_ISSUER - len(upstream) - 4)
    with serve(app, sock):
        # Beyond ASCII, 1,024 characters may be 4,096 bytes, past any index entry: refused too.
        wide = f"{upstream}/as/" + "\N{GRINNING FACE}" * 20
        for issuer in (
            at_the_bound + "a",
            "javascript:alert(1)",
            f"ftp://{upstream[7:]}/as/x",
            wide,
            "https://[x/as",  # urlsplit refuses it (a ValueError: a 500 before)
        ):
            resource.authorization_servers[:] = [issuer]
            client = UpstreamOAuthClient(f"{upstream}/mcp", UpstreamOAuth())
            with pytest.raises(UpstreamOAuthError, match=f"at most {MAX_ISSUER} ASCII characters"):
                asyncio.run(client.metadata())
        resource.authorization_servers[:] = [at_the_bound]
        found = asyncio.run(UpstreamOAuthClient(f"{upstream}/mcp", UpstreamOAuth()).metadata())
        assert found.issuer == at_the_bound and len(at_the_bound) == MAX_ISSUER
        # Metadata whose issuer is not text is not the server's (an AttributeError before: a
        # 500 to the person connecting, and at every refresh).
        for odd in (5, None, [at_the_bound], {"issuer": at_the_bound}):
            server.metadata_overrides["issuer"] = odd
            client = UpstreamOAuthClient(f"{upstream}/mcp", UpstreamOAuth())
            with pytest.raises(UpstreamOAuthError, match="does not name it as its issuer"):
                asyncio.run(client.metadata())


@contextmanager
def _authorization_server(**switches: bool) -> Iterator[AuthorizationServer]:
    """An upstream's authorization server (`fakes.AuthorizationServer`, with ``switches``),
    served on the loopback, with metadata for every issuer under it (``{base}/as/<name>``)."""
    sock = free_socket()
    server = AuthorizationServer(base=loopback_base(sock), under_paths=True, **switches)
    with serve(server.app(), sock):
        yield server


def test_metadata_naming_another_issuer_than_the_server_asked_is_refused():
    # RFC 8414 §3.3: the issuer in the metadata is the one asked, else a mix-up (another
    # server's metadata, served here, would send the person's code and tokens there).
    with _authorization_server() as server:
        base = server.base
        server.issuer = f"{base}/as/evil"  # whichever issuer under it is asked
        for issuer in (f"{base}/as/good", f"{base}/as/good/"):
            client = UpstreamOAuthClient(f"{base}/mcp", UpstreamOAuth(issuer=issuer))
            with pytest.raises(UpstreamOAuthError, match="does not name it as its issuer"):
                asyncio.run(client.metadata())
        named = UpstreamOAuthClient(f"{base}/mcp", UpstreamOAuth(issuer=f"{base}/as/evil"))
        assert asyncio.run(named.metadata()).issuer == f"{base}/as/evil"


def test_an_authorization_server_that_does_not_advertise_pkce_s256_is_refused():
    # OAuth 2.1 and MCP: no PKCE S256 advertised, no person sent there to authorize.
    with _authorization_server() as server:
        base = server.base
        for advertised in (None, [], ["plain"], "S256"):
            server.pkce_methods = advertised
            client = UpstreamOAuthClient(f"{base}/mcp", UpstreamOAuth(issuer=f"{base}/as/a"))
            with pytest.raises(UpstreamOAuthError, match="does not advertise PKCE S256"):
                asyncio.run(client.metadata())
        server.pkce_methods = ["plain", "S256"]
        client = UpstreamOAuthClient(f"{base}/mcp", UpstreamOAuth(issuer=f"{base}/as/a"))
        assert asyncio.run(client.metadata()).issuer == f"{base}/as/a"


def test_a_token_that_is_not_a_bearer_token_is_refused():
    # bastion sends the upstream token as a Bearer token; a DPoP- or MAC-bound one it cannot use.
    with _authorization_server(issues_refresh_tokens=False) as server:
        base = server.base
        client = UpstreamOAuthClient(f"{base}/mcp", UpstreamOAuth(issuer=f"{base}/as/a"))
        meta = asyncio.run(client.metadata())
        for kind in ("DPoP", "mac", "", None):
            server.token_type = kind
            with pytest.raises(UpstreamOAuthError, match="no bearer token"):
                asyncio.run(client.refresh(meta, {"client_id": "bastion"}, "r", 0.0))
        for kind in ("Bearer", "bearer"):
            server.token_type = kind
            tokens = asyncio.run(client.refresh(meta, {"client_id": "bastion"}, "r", 0.0))
            assert tokens.access_token == f"access-of-as-{server.tokens_issued}"


def test_the_metadata_is_fetched_once_for_calls_that_need_it_at_once_and_a_failure_is_kept(
    monkeypatch,
):
    """Every call of a user whose token needs refreshing needs the authorization server's
    metadata until it has been fetched once: each started its own fetches (each held up to
    timeout_seconds by a slow server), and a server that was down was asked again by each."""
    sock = free_socket()
    base = loopback_base(sock)
    # Each read of the upstream's metadata is held until every call is waiting, and fails.
    resource = ResourceMetadata(base, [base], holds=True)
    resource.down = True
    server = AuthorizationServer(base=base)
    app = Starlette(routes=[*resource.routes(), *server.routes()])
    # The calls that have asked for the metadata (entered `CoalescedFetches.once`, on the event
    # loop, before it waits for a read under way).
    entered, once = [], CoalescedFetches.once

    async def counted(self, key, fetch, kept):
        entered.append(key)
        return await once(self, key, fetch, kept)

    monkeypatch.setattr(CoalescedFetches, "once", counted)

    async def at_once(client, n):
        async def one():
            try:
                return await client.metadata()
            except UpstreamOAuthError as e:
                return e

        before, asked = resource.reads, len(entered)
        tasks = [asyncio.create_task(one()) for _ in range(n)]
        # Released once every call waits for the one read (or has read on its own, and been
        # counted by the upstream), not after a moment in which a busy machine may start none.
        assert await eventually_async(
            lambda: resource.reads > before and len(entered) >= asked + n
        ), "the calls never all asked for the metadata"
        resource.release.set()
        return await asyncio.gather(*tasks)

    with serve(app, sock):
        client = UpstreamOAuthClient(f"{base}/mcp", UpstreamOAuth(timeout_seconds=60))
        failed = asyncio.run(at_once(client, 5))
        assert all(isinstance(f, UpstreamOAuthError) and "503" in str(f) for f in failed)
        assert (resource.reads, server.metadata_reads) == (1, 0)
        # Within timeout_seconds of the failure, the calls are refused with its reason at once.
        resource.down = False
        with pytest.raises(UpstreamOAuthError, match="503"):
            asyncio.run(client.metadata())
        assert (resource.reads, server.metadata_reads) == (1, 0)
        resource.release.clear()
        client = UpstreamOAuthClient(f"{base}/mcp", UpstreamOAuth(timeout_seconds=60))
        found = asyncio.run(at_once(client, 5))
        assert {m.issuer for m in found} == {base}
        # The upstream's metadata read once more, and then the server's, once.
        assert (resource.reads, server.metadata_reads) == (2, 1)


@pytest.mark.parametrize("expires_in", [9e18, 10**30, 366 * 86_400])
def test_an_upstream_token_lives_at_most_a_year_whatever_expires_in_says(expires_in):
    """A time past the calendar broke what compares or shows it (``connections list``)."""
    client = UpstreamOAuthClient("https://mcp.example/mcp", UpstreamOAuth())
    answer = {"access_token": "a", "token_type": "Bearer", "expires_in": expires_in}
    meta = ServerMetadata("https://as.example", "https://as.example/a", "https://as.example/t")
    tokens = client._tokens(answer, 1_000.0, "", meta)
    assert tokens.expires_at == 1_000.0 + MAX_EXPIRES_IN
    assert client._tokens({**answer, "expires_in": 60}, 1_000.0, "", meta).expires_at == 1_060.0


def test_revocations_are_retried_for_seven_days_unless_set_otherwise():
    assert _gateway(auth="per_user").upstream("tracker").oauth.revocation_retry_seconds == 604800
    shorter = _gateway(auth="per_user", oauth={"revocation_retry_seconds": 3600})
    assert shorter.upstream("tracker").oauth.revocation_retry_seconds == 3600
    for wrong in (0, -1, True, "1d", float("inf")):
        with pytest.raises(ConfigError, match="revocation_retry_seconds must be a positive"):
            _gateway(auth="per_user", oauth={"revocation_retry_seconds": wrong})
