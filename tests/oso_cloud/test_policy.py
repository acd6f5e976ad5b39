"""``oso.policy(...)`` puts a policy in force through the SDK, as ``PUT /v1/policy`` does: checked
first (an error changes nothing), versioned, and applied before the answer."""

from __future__ import annotations

import pytest
from oso_cloud import OsoException, Value
from oso_cloud.api import Policy

from tests.oso_cloud.conftest import admin, start

NEW = """
actor User {}
resource Doc {
  roles = ["viewer", "editor"];
  permissions = ["view", "edit"];
  relations = { folder: Folder };
  "view" if "viewer";
  "edit" if "editor";
  "viewer" if "editor";
  "viewer" if "viewer" on "folder";
}
resource Folder {
  roles = ["viewer"];
}
allow(actor, action, resource) if has_permission(actor, action, resource);
"""


@pytest.fixture
def running(tmp_path):
    r = start(tmp_path, str(tmp_path / "bastion.db"))
    yield r
    r.server.stop()


def test_a_policy_uploaded_is_in_force_for_the_next_question(running):
    oso = running.oso("oso:read", "oso:write")
    alice, doc, folder = Value("User", "alice"), Value("Doc", "d1"), Value("Folder", "f1")
    # Doc is not a type of the policy in force yet.
    assert oso.api.get_policy().policy["src"].startswith("\nactor User {}\nactor Agent {}")
    assert refused(lambda: oso.authorize(alice, "view", doc)).status_code == 422
    oso.policy(NEW)
    assert oso.api.get_policy().policy == {"filename": "policy.polar", "src": NEW}
    meta = oso.get_policy_metadata().resources
    assert meta["Doc"].relations == {"folder": "Folder"}
    assert meta["Doc"].permissions == ["edit", "view"]
    oso.insert(("has_role", alice, "viewer", folder))
    oso.insert(("has_relation", doc, "folder", folder))
    assert oso.authorize(alice, "view", doc) is True
    assert oso.authorize(alice, "edit", doc) is False
    # A version like any other: /v1 sees it, written by the SDK's key.
    with admin(running) as client:
        versions = client.get("/v1/policy/versions").json()["versions"]
    assert len(versions) == 2
    assert versions[-1]["version"] == 2


def test_a_policy_with_a_warning_is_in_force_and_its_warning_told(running):
    # The SDK's answer has a message alone: the warning that `PUT /v1/policy` lists is in it, and
    # in the server's log, not lost.
    oso = running.oso("oso:read", "oso:write")
    warned = NEW + 'mask(_u: User, "view", _d: Doc, "$..email");\n'
    answer = oso.api.post_policy(Policy("policy.polar", warned))
    assert answer.message.startswith("policy version 2 in force with 1 warning(s):\n")
    assert "policy.polar:16:33: warning: the mask path '$..email' cannot be read" in answer.message
    assert oso.api.get_policy().policy["src"] == warned
    log = running.server.log.read_text()
    assert "policy version 2 (oso-cloud SDK): policy.polar:16:33: warning: the mask path" in log
    # A policy without a warning says only that it is in force.
    assert oso.api.post_policy(Policy("policy.polar", NEW)).message == "policy version 3 in force"


def test_a_policy_with_an_error_changes_nothing(running):
    oso = running.oso("oso:read", "oso:write")
    before = oso.api.get_policy().policy["src"]
    e = refused(lambda: oso.policy('actor User {}\nresource Doc {\n  "view" if "viewer";\n}\n'))
    assert e.status_code == 422
    assert "policy.polar:3" in str(e)
    assert "'view'" in str(e)
    assert oso.api.get_policy().policy["src"] == before


def test_a_read_key_cannot_upload_a_policy(running):
    oso = running.oso("oso:read")
    e = refused(lambda: oso.policy(NEW))
    assert e.status_code == 403
    assert "oso:write" in str(e)
    assert "Doc" not in oso.get_policy_metadata().resources


def refused(call) -> OsoException:
    with pytest.raises(OsoException) as e:
        call()
    return e.value


def test_a_fact_of_an_earlier_policy_can_still_be_deleted(running):
    """A delete the policy in force has no use for is refused only where it matches nothing:
    facts an earlier policy used stay deletable."""
    oso = running.oso("oso:read", "oso:write")
    repo = Value("Repo", "left-over")
    oso.insert(("is_public", repo))
    oso.policy(NEW)  # no is_public
    oso.delete(("is_public", repo))
    with admin(running) as client:
        left = client.get(
            "/v1/facts", params={"pattern": '{"predicate": "is_public", "args": [null]}'}
        ).json()
    assert left["facts"] == []
    # Now nothing matches: a delete of it is refused, as a misspelt one is.
    e = refused(lambda: oso.delete(("is_public", repo)))
    assert e.status_code == 422
    assert "no use for is_public/1 facts" in str(e)
