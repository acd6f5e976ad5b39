"""Half of a UTF-16 surrogate pair in a JSON string (``"\\ud800"``): JSON's grammar allows the
escape, `json.loads` keeps it, and the string it makes is not Unicode text. Taken in, it failed
later, wherever it was written as UTF-8: a 500 from a fact or policy write, from an answer that
echoed it, a stalled gateway call, and a decision record that no write could store, which held
back every record after it. The one JSON reader for what others send (`bastion.untrusted_json`)
refuses it, so every route refuses it alike, with a 400 that names the place, and changes nothing.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import untrusted_json
from bastion.facts.store import FactStore
from tests.server.conftest import POLICY, serve_policy

# Text with surrogates in it often (Hypothesis's characters leave them out unless asked): alone,
# or two side by side, which may make a pair.
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
anything = st.text(st.characters() | surrogates, max_size=6)
values = st.recursive(
    st.none() | st.integers(-5, 5) | anything,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(anything, inner, max_size=3),
    max_leaves=12,
)


def strings(value):
    """Every string and key in ``value``."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def refusal(value) -> str | None:
    """What the reader says of ``value`` (a pattern), if it is refused: a string or key that is
    not Unicode text, or that holds a NUL (`tests.security.test_nul`)."""
    reasons = set()
    for text in strings(value):
        if "\x00" in text:
            reasons.add("U\\+0000")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            reasons.add("half of a UTF-16 surrogate pair")
    return "|".join(sorted(reasons)) or None


@settings(max_examples=300, deadline=None)
@given(value=values, ascii_only=st.booleans())
def test_json_is_read_exactly_when_all_its_strings_are_unicode_text(value, ascii_only):
    # ASCII-only, a surrogate is an escape (and an emoji a pair of them); otherwise a str given
    # to the reader holds the surrogate itself. What the text means is what json.loads reads:
    # two escapes of a pair side by side are one character.
    text = json.dumps(value, ensure_ascii=ascii_only)
    meant = json.loads(text)
    refused = refusal(meant)
    if refused is None:
        assert untrusted_json.loads(text) == meant
        assert untrusted_json.loads(text.encode("utf-8")) == meant
    else:
        with pytest.raises(untrusted_json.JsonRefused, match=refused):
            untrusted_json.loads(text)


def test_a_pair_and_an_escaped_backslash_are_read():
    assert untrusted_json.loads(r'{"e": "\ud83d\ude00"}') == {"e": "\N{GRINNING FACE}"}
    assert untrusted_json.loads('{"e": "\N{GRINNING FACE}"}'.encode()) == {"e": "\N{GRINNING FACE}"}
    assert untrusted_json.loads(r'{"e": "\\ud800"}') == {"e": "\\ud800"}
    with pytest.raises(untrusted_json.JsonRefused) as refused:
        untrusted_json.loads(r'{"facts": [{"args": ["ok", "\ude00\ud83d"]}]}')
    assert refused.value.path == "facts[0].args[1]"


LONE = "\ud800"
USER = {"type": "User", "id": LONE}
TEAM = {"type": "Team", "id": "support"}

ATTEMPTS = {
    "a fact written": ("POST", "/v1/facts", {"facts": [{"predicate": "has_role", "args": [USER, "member", TEAM]}]}),
    "a fact deleted": ("POST", "/v1/facts/delete", {"patterns": [{"predicate": "has_role", "args": [USER, None, None]}]}),
    "a policy put": ("PUT", "/v1/policy", {"text": POLICY + "# " + LONE + "\n"}),
    "a policy's note": ("PUT", "/v1/policy", {"text": POLICY, "note": LONE}),
    "a policy validated": ("POST", "/v1/policy/validate", {"text": LONE}),
    "a query echoed in its refusal": ("POST", "/v1/query", {"predicate": LONE, "args": []}),
    "a chain decided in the protocol": ("POST", "/v1/authorize/batch", {"checks": [{"principals": [USER, "Agent:x"], "action": "read", "resource": "Doc:d"}]}),
    "a chain decided": ("POST", "/v1/authorize", {"principals": [USER, "Agent:x"], "action": "read", "resource": "Doc:d"}),
    "a signal": ("POST", "/v1/signals", {"subject": USER, "name": "risk", "value": 1, "source": "t"}),
    "an Oso Cloud fact": ("POST", "/api/batch", [{"inserts": [{"predicate": "has_role", "args": [USER, {"type": "String", "id": "member"}, TEAM]}]}]),
}  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = serve_policy(tmp_path_factory.mktemp("surrogates"))
    yield running
    running.stop()


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
def test_a_lone_surrogate_is_refused_by_every_route_and_changes_nothing(server, attempt):
    method, path, body = ATTEMPTS[attempt]
    store = FactStore.open(server.database)
    try:
        head = store.head()
        with server.client() as admin:
            response = admin.request(
                method,
                path,
                content=json.dumps(body).encode(),  # ASCII: the surrogate as its escape
                headers={"content-type": "application/json"},
            )
        assert response.status_code == 400, response.text
        # Oso Cloud's API says it as Oso Cloud does (its SDK raises the message).
        said = response.json()["message" if path.startswith("/api/") else "detail"]
        assert "half of a UTF-16 surrogate pair" in said
        assert store.head() == head  # no write, no entry in the change log
    finally:
        store.close()
    # The server answers the next request as before.
    assert httpx.get(f"{server.url}/healthz").status_code == 200
