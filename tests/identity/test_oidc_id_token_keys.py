"""A provider's ID token signing: the ``alg`` must be one the provider announces in its discovery
document (OpenID Connect Discovery 1.0 §3, ``id_token_signing_alg_values_supported``; RS256 when
it announces none, Core §3.1.3.7 step 7) and one of ``algorithms``; and the provider's keys
rotate: a key the cached set lacks (a new ``kid``, or no ``kid`` while the set holds several)
fetches the set again, at most once per ``jwks_refetch_seconds``. The provider is the real HTTP
server of test_oidc_login_refusals.py, each test with a bastion of its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from joserfc.jwk import ECKey, RSAKey

from tests.oauth.support import free_socket, serve

from .oidc_support import Person, bastion_with_providers
from .test_oidc_login_refusals import SECRETS, TestProvider, refused


@pytest.fixture(scope="module")
def idp():
    provider = TestProvider()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        yield provider


@contextmanager
def provider_login(tmp_path, idp, name: str, **settings) -> Iterator[tuple]:
    """A bastion with the one provider ``name`` of ``idp`` (``settings`` over the defaults), a
    registered MCP client and a person's browser."""
    identity = {
        "providers": [
            {
                "id": name,
                "issuer": idp.issuer(name),
                "client_id": f"bastion-{name}",
                "client_secret": SECRETS[f"bastion-{name}"],
                **settings,
            }
        ]
    }
    with bastion_with_providers(
        str(tmp_path / f"{name}.db"), str(tmp_path / "keys"), free_socket(), identity
    ) as b:
        person = Person(b)
        try:
            yield b, b.register(), person
        finally:
            person.close()


def log_in(idp, person, client, name: str, **issue):
    """One login at provider ``name`` whose ID token is made as ``issue`` says; bastion's
    answer at the callback."""
    query = person.sent_to_provider(client, name)
    code = idp.issue(name, query, **issue)
    return person.back_from_provider(name, code=code, state=query["state"])


def signed_in(response) -> bool:
    return response.status_code == 200 and "Allow access?" in response.text


# -- the algorithm the provider announces --------------------------------------------------------


def test_an_id_token_signed_with_an_alg_the_provider_does_not_announce_is_refused(tmp_path, idp):
    ec = ECKey.generate_key("P-256", parameters={"kid": "e1"})
    idp.published["s"] = [idp.key, ec]
    idp.announced["s"] = ["ES256"]
    try:
        with provider_login(tmp_path, idp, "s") as (b, client, person):
            # RS256 is among bastion's algorithms and its key is the provider's: still refused,
            # the provider says it signs ID tokens with ES256 only.
            response = log_in(idp, person, client, "s")
            refused(response, 400, "alg 'RS256' is not one of ['ES256']")
            assert "id_token_signing_alg_values_supported" in response.text
            taken = log_in(idp, person, client, "s", signer=({"alg": "ES256", "kid": "e1"}, ec))
            assert signed_in(taken), taken.text
    finally:
        idp.published.pop("s")
        idp.announced.pop("s")


def test_a_provider_announcing_no_list_is_taken_to_sign_with_rs256(tmp_path, idp):
    # Core §3.1.3.7 step 7: RS256, the default, when nothing else was agreed.
    ec = ECKey.generate_key("P-256", parameters={"kid": "e1"})
    idp.published["s"] = [idp.key, ec]
    try:
        with provider_login(tmp_path, idp, "s") as (b, client, person):
            assert signed_in(log_in(idp, person, client, "s"))
            response = log_in(idp, person, client, "s", signer=({"alg": "ES256", "kid": "e1"}, ec))
            refused(response, 400, "alg 'ES256' is not one of ['RS256']")
    finally:
        idp.published.pop("s")


@pytest.mark.parametrize(
    ("announced", "words"),
    [
        (["HS256", "none"], "only with ['HS256', 'none']"),
        (["RS256"], "only with ['RS256']"),  # none of the provider's algorithms below
        ("RS256", "is not a list of algorithm names"),
        ([], "is not a list of algorithm names"),
    ],
    ids=["symmetric-and-none", "not-configured", "a-string", "empty"],
)
def test_a_provider_announcing_none_of_the_algorithms_signs_nobody_in(
    tmp_path, idp, announced, words
):
    idp.announced["s"] = announced
    try:
        with provider_login(tmp_path, idp, "s", algorithms=["ES256"]) as (b, client, person):
            page = person.open_authorization(client)
            response = person.choose(page, "s")
            refused(response, 503, words)
            assert "id_token_signing_alg_values_supported" in response.text
    finally:
        idp.announced.pop("s")


# -- keys rotating at the provider ---------------------------------------------------------------


def test_a_new_kid_fetches_the_key_set_again_once_then_is_taken(tmp_path, idp):
    new = RSAKey.generate_key(2048, parameters={"kid": "k2"})
    idp.jwks_fetches.pop("r", None)
    try:
        with provider_login(tmp_path, idp, "r") as (b, client, person):
            assert signed_in(log_in(idp, person, client, "r"))  # the set [k1] is cached now
            assert idp.jwks_fetches["r"] == 1
            idp.published["r"] = [new]  # the provider rotates
            b.clock.advance(31)  # past jwks_refetch_seconds since the fetch
            taken = log_in(idp, person, client, "r", signer=({"alg": "RS256", "kid": "k2"}, new))
            assert signed_in(taken), taken.text
            assert idp.jwks_fetches["r"] == 2
    finally:
        idp.published.pop("r", None)


def test_an_unknown_kid_fetches_the_key_set_at_most_once_per_jwks_refetch_seconds(tmp_path, idp):
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k9"})
    signer = ({"alg": "RS256", "kid": "k9"}, stranger)
    idp.jwks_fetches.pop("r", None)
    with provider_login(tmp_path, idp, "r") as (b, client, person):
        assert signed_in(log_in(idp, person, client, "r"))
        b.clock.advance(31)
        for _ in range(3):  # anyone can make up kids: one fetch for all of them
            refused(log_in(idp, person, client, "r", signer=signer), 400, "not signed by a key")
        assert idp.jwks_fetches["r"] == 2
        b.clock.advance(31)
        refused(log_in(idp, person, client, "r", signer=signer), 400, "not signed by a key")
        assert idp.jwks_fetches["r"] == 3


def test_no_kid_with_several_cached_keys_fetches_the_key_set_again(tmp_path, idp):
    new = RSAKey.generate_key(2048, parameters={"kid": "k2"})
    idp.published["r"] = [idp.key, new]
    idp.jwks_fetches.pop("r", None)
    try:
        with provider_login(tmp_path, idp, "r") as (b, client, person):
            assert signed_in(log_in(idp, person, client, "r"))  # [k1, k2] cached
            b.clock.advance(31)
            # Still two keys at the provider: which one signed is not said, so refused,
            # after one fetch that might have found a single key.
            unnamed = log_in(idp, person, client, "r", signer=({"alg": "RS256"}, new))
            refused(unnamed, 400, "not signed by a key")
            assert idp.jwks_fetches["r"] == 2
            idp.published["r"] = [new]  # the old key retired
            b.clock.advance(31)
            taken = log_in(idp, person, client, "r", signer=({"alg": "RS256"}, new))
            assert signed_in(taken), taken.text
            assert idp.jwks_fetches["r"] == 3
    finally:
        idp.published.pop("r", None)
