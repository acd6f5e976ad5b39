"""The authorization server mix-up (RFC 9700 §4.4, RFC 9207) against per-user connections: two
upstreams, each with an authorization server of its own served by uvicorn, one of them hostile.

The hostile server sends the person's browser on to the honest one, with bastion's client id and
redirect URI there (which any user of bastion can read in a connection link of their own), and
with the ``state`` and PKCE challenge of the flow bastion started toward the hostile server. The
honest server authorizes the person and sends the code back to bastion. Were bastion to redeem it
at the hostile server's token endpoint, with the PKCE verifier, the hostile server would redeem
both at the honest one (bastion's client there is public: dynamic registration) and hold the
person's tokens for the honest upstream.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from bastion.oauth.users import create_user
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests.connections.fakes import AuthorizationServer
from tests.connections.hostile_text import HOSTILE, assert_escaped_and_cut
from tests.connections.test_upstream_connections import POLICY, run
from tests.oauth.support import free_socket, serve


class HostileServer(AuthorizationServer):
    """The authorization server of an upstream an attacker controls. Its authorization endpoint
    sends the browser to the honest server with bastion's client there (``victim_client``:
    client id and redirect URI) and the state and challenge bastion sent it; its token endpoint
    redeems whatever code and verifier bastion sends it at the honest server (``stolen``)."""

    def __init__(self, honest: AuthorizationServer) -> None:
        super().__init__("hostile", revocation=False, client_id="bastion-at-hostile")
        self.honest = honest
        self.victim_client: dict[str, str] = {}
        self.stolen: list[dict] = []

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        onward = {
            "response_type": "code",
            "client_id": self.victim_client["client_id"],
            "redirect_uri": self.victim_client["redirect_uri"],
            "state": q["state"],
            "code_challenge": q["code_challenge"],
            "code_challenge_method": "S256",
        }
        return RedirectResponse(
            f"{self.honest.base}/authorize?{urlencode(onward)}", status_code=302
        )

    async def token(self, request: Request) -> Response:
        form = await request.form()
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.post(
                f"{self.honest.base}/token",
                data={
                    "grant_type": "authorization_code",
                    "code": form.get("code", ""),
                    "code_verifier": form.get("code_verifier", ""),
                    "client_id": self.victim_client["client_id"],
                    "redirect_uri": self.victim_client["redirect_uri"],
                },
            )
        if answer.status_code == 200:
            self.stolen.append(answer.json())
        return JSONResponse({"error": "invalid_grant"}, status_code=400)


@pytest.fixture
def peers(tmp_path):
    """bastion with the upstreams ``honest`` and ``hostile`` (``auth = "per_user"``, dynamic
    registration at each one's authorization server), the two servers, and bastion's URL."""
    # An upstream's authorization server: dynamic registration of public clients, an
    # authorization endpoint that authorizes its signed-in person ("alice@honest") at once and
    # sends the code to a redirect URI registered for the client (exactly), a token endpoint
    # that checks the client, the redirect URI and the PKCE verifier. It sends no ``iss``.
    honest = AuthorizationServer("honest", revocation=False, checks_codes=True)
    hostile = HostileServer(honest)
    honest_sock, hostile_sock, one_sock = free_socket(), free_socket(), free_socket()
    honest.base = f"http://127.0.0.1:{honest_sock.getsockname()[1]}"
    hostile.base = f"http://127.0.0.1:{hostile_sock.getsockname()[1]}"
    one_url = f"http://127.0.0.1:{one_sock.getsockname()[1]}/one"
    origin = one_url.removesuffix("/one")
    (tmp_path / "policy.polar").write_text(POLICY)
    one = create_app(
        ServerConfig(
            database=str(tmp_path / "one.db"),
            policy_file=str(tmp_path / "policy.polar"),
            oauth={
                "issuer": one_url,
                "key_dir": str(tmp_path / "keys"),
                "resources": [
                    {"uri": f"{origin}/mcp/{name}", "scopes": ["s"]}
                    for name in ("honest", "hostile")
                ],
            },
            gateway={
                "upstreams": [
                    {
                        "name": name,
                        "url": f"{server.base}/mcp",
                        "auth": "per_user",
                        "oauth": {"issuer": server.base},
                    }
                    for name, server in (("honest", honest), ("hostile", hostile))
                ]
            },
        )
    )
    for name in ("alice", "mallory"):
        create_user(one.state.oauth.store, name, "a-long-enough-password", time.time(), actor="t")
    with (
        serve(honest.app(), honest_sock),
        serve(hostile.app(), hostile_sock),
        serve(one, one_sock),
    ):
        yield one, honest, hostile, one_url


def _session(one, person: str) -> str:
    """A browser session signed in at bastion as ``person`` (connections start in one)."""
    return one.state.oauth.store.create_session(person, time.time(), 600)


def _started(one, person: str, upstream: str, session: str = "") -> tuple[str, str]:
    """``person`` starts a connection to ``upstream`` in a browser session (``session``, or a
    new one): the authorization URL, and the session."""
    session = session or _session(one, person)
    return run(lambda: one.state.connections.start(person, upstream, browser=session)), session


def _browser_through(one_url: str, started: tuple[str, str]) -> httpx.Response:
    """The browser session of a connection ``started`` follows the redirects from its
    authorization URL through the authorization servers back to bastion; bastion's last
    answer."""
    first, session = started
    with httpx.Client(cookies={"bastion_session": session}, timeout=10) as browser:
        answer = browser.get(first)
        while answer.is_redirect:
            answer = browser.get(answer.headers["location"])
            if answer.url.path.startswith(urlsplit(one_url).path):
                break
    return answer


def test_a_hostile_upstreams_server_never_gets_the_code_another_server_issued(peers):
    one, honest, hostile, one_url = peers
    connections = one.state.connections
    # mallory, a user of bastion, reads bastion's client at the honest server from a connection
    # link of her own, and gives it to the server she controls.
    link = parse_qs(urlsplit(_started(one, "mallory", "honest")[0]).query)
    hostile.victim_client = {
        "client_id": link["client_id"][0],
        "redirect_uri": link["redirect_uri"][0],
    }

    # alice connects to the hostile upstream (its tool looked useful), signed in at both bastion
    # and the honest server.
    answer = _browser_through(one_url, _started(one, "alice", "hostile"))

    assert hostile.stolen == []  # the hostile server holds no token of alice's at the honest one
    assert honest.issued == []  # nobody redeemed the code the honest server issued for alice
    assert answer.status_code in (400, 403), answer.text
    assert connections.listed("alice") == []


def test_a_connection_to_an_honest_server_still_completes(peers):
    one, honest, _, one_url = peers
    connections = one.state.connections
    answer = _browser_through(one_url, _started(one, "alice", "honest"))
    assert answer.status_code == 200 and "Connected" in answer.text, answer.text
    assert [c.upstream for c in connections.listed("alice")] == ["honest"]
    assert honest.issued == [{"client_id": list(honest.clients)[0], "user": "alice@honest"}]


def _answer_of(started: tuple[str, str]) -> tuple[dict[str, str], str]:
    """The honest server's answer for an authorization request bastion started (the query it
    sends the browser back with), and the browser session that started it."""
    honest_link, session = started
    with httpx.Client(timeout=10) as browser:
        location = browser.get(honest_link).headers["location"]
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}, session


def _callback(one_url: str, upstream: str, query: dict[str, str], session: str) -> httpx.Response:
    with httpx.Client(cookies={"bastion_session": session}, timeout=10) as browser:
        return browser.get(f"{one_url}/connections/{upstream}/callback?{urlencode(query)}")


def test_an_answer_whose_iss_is_not_its_servers_or_is_missing_when_promised_is_refused(peers):
    """RFC 9207: a server whose metadata says it sends ``iss`` in every answer is trusted only
    with it, naming itself."""
    one, honest, hostile, one_url = peers
    honest.sends_iss = True
    connections = one.state.connections
    for wrong in ({"iss": hostile.base}, {"iss": None}):
        query, session = _answer_of(_started(one, "alice", "honest"))
        assert query["iss"] == honest.base
        query = {k: v for k, v in {**query, **wrong}.items() if v is not None}
        answer = _callback(one_url, "honest", query, session)
        assert answer.status_code == 400 and "nothing was connected" in answer.text, wrong
    assert honest.issued == []  # neither code was redeemed
    query, session = _answer_of(_started(one, "alice", "honest"))
    assert _callback(one_url, "honest", query, session).status_code == 200
    assert [c.upstream for c in connections.listed("alice")] == ["honest"]


def test_a_registration_made_for_the_shared_callback_is_made_again_for_the_upstreams_own(peers):
    """Before each upstream had its own redirect URI, bastion registered its client with the
    callback all upstreams shared: such a registration lets the honest server send a code
    where a flow of the hostile one can take it, so it is not used again."""
    one, honest, _, one_url = peers
    connections = one.state.connections
    run(connections.clients["honest"].metadata)
    old = connections.sealer.seal(
        "", f"honest {honest.base}", {"client_id": "old-client", "client_secret": ""}
    )
    honest.clients["old-client"] = [f"{one_url}/connections/callback"]
    connections.store.add_client("honest", honest.base, old)

    link = parse_qs(urlsplit(_started(one, "alice", "honest")[0]).query)

    assert link["client_id"] != ["old-client"]
    assert link["redirect_uri"] == [f"{one_url}/connections/honest/callback"]
    assert honest.clients[link["client_id"][0]] == link["redirect_uri"]
    assert connections.store.client("honest", honest.base) != old


def test_a_token_endpoints_refusal_reaches_the_callback_page_escaped_and_cut(peers):
    one, honest, _, one_url = peers
    honest.refuse("invalid_request", error_description=HOSTILE)
    query, session = _answer_of(_started(one, "alice", "honest"))
    page = _callback(one_url, "honest", query, session)
    assert page.status_code == 502
    assert_escaped_and_cut(page.text, page=True)
    assert one.state.connections.listed("alice") == []


def test_the_iss_and_upstream_of_a_callback_query_are_shown_escaped_and_cut(peers):
    """Anyone can send a signed-in person back to a callback with any ``iss`` and upstream
    name in the URL: the refusal shows them as `bastion.names.readable` does."""
    one, _, _, one_url = peers
    query, session = _answer_of(_started(one, "alice", "honest"))
    page = _callback(one_url, "honest", {**query, "iss": HOSTILE}, session)
    assert page.status_code == 400 and "nothing was connected" in page.text
    assert_escaped_and_cut(page.text, page=True)

    query, session = _answer_of(_started(one, "alice", "honest"))
    page = _callback(one_url, quote(HOSTILE, safe=""), query, session)
    assert page.status_code == 400 and "nothing was connected" in page.text
    assert_escaped_and_cut(page.text, page=True)
