from .support import Bastion


def test_a_registered_public_client_gets_tokens_bound_to_the_resource(bastion: Bastion):
    client = bastion.register()
    tokens = bastion.tokens_for(client)
    verified = bastion.server.verifier.verify(tokens["access_token"], bastion.resource)
    assert verified.subject == "alice"
    assert verified.client_id == client["client_id"]
    assert verified.scopes == {"tools:read"}
    assert tokens["refresh_token"]
