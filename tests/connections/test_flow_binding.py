"""A connection finishes only in the browser session that started it (RFC 6749 §10.12, RFC 9700
§4.7: ``state`` bound to the user agent), not merely for the same bastion user.

Bound to the user alone, a flow could be finished by any browser signed in as its starter. An
attacker who signs a victim's browser in to bastion as herself (a login CSRF at any of the
ways in: bastion's sign-in, an identity provider's callback) and sends it through the
authorization URL of a flow she started in her own browser had the victim's account at the
upstream attached to her bastion user: every call of hers then carried the victim's upstream
token. The flow now keeps a digest of the session that started it.
"""

from __future__ import annotations

import time

import httpx

from tests.connections.test_mix_up import peers  # noqa: F401 (the fixture)
from tests.oauth.support import hidden_fields


def _browser(one, person: str) -> httpx.Client:
    """A browser signed in at bastion as ``person`` (a session of its own)."""
    session = one.state.oauth.store.create_session(person, time.time(), 600)
    return httpx.Client(cookies={"bastion_session": session}, timeout=10)


def _started(browser: httpx.Client, one_url: str, upstream: str) -> str:
    """``browser`` presses Connect on ``upstream``'s page: the authorization URL it is sent to."""
    page = browser.get(f"{one_url}/connections/{upstream}/connect")
    form = hidden_fields(page.text)
    answer = browser.post(f"{one_url}/connections/{upstream}/connect", data=form)
    assert answer.status_code == 303, answer.text
    return answer.headers["location"]


def _through(browser: httpx.Client, link: str, one_url: str) -> httpx.Response:
    """``browser`` follows ``link`` through the authorization server back to bastion."""
    answer = browser.get(link)
    while answer.is_redirect:
        answer = browser.get(answer.headers["location"])
        if answer.url.path.startswith(httpx.URL(one_url).path):
            break
    return answer


def test_a_flow_is_finished_only_in_the_browser_session_that_started_it(peers):  # noqa: F811
    one, honest, _, one_url = peers
    with _browser(one, "mallory") as mallorys, _browser(one, "mallory") as victims:
        # mallory starts a connection in her own browser, and has the victim's browser, signed
        # in to bastion as mallory, follow its link: the honest server authorizes the victim
        # ("alice@honest" there) and sends the code back to bastion.
        link = _started(mallorys, one_url, "honest")
        answer = _through(victims, link, one_url)

    assert answer.status_code == 403 and "nothing was connected" in answer.text, answer.text
    assert one.state.connections.listed("mallory") == []
    assert honest.issued == []  # the victim's code was redeemed by nobody


def test_the_browser_session_that_started_a_flow_finishes_it(peers):  # noqa: F811
    one, honest, _, one_url = peers
    with _browser(one, "alice") as browser:
        answer = _through(browser, _started(browser, one_url, "honest"), one_url)
    assert answer.status_code == 200 and "Connected" in answer.text, answer.text
    assert [c.upstream for c in one.state.connections.listed("alice")] == ["honest"]
    assert [i["user"] for i in honest.issued] == ["alice@honest"]
