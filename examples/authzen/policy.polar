# The certification fixture of the OpenID AuthZEN Authorization API 1.0 (openid/authzen,
# certification/authorization-api-1_0-scenario.md, "Required Fixture") as a bastion policy;
# its data is fixture.facts. AuthZEN's subject, resource and action properties reach the
# policy as context.subject, context.resource and context.action (docs/authzen.md).
#
# The fixture asks for eight decisions: alice may read and write record-1, bob may read it
# but not write it; writing an archived record is refused unless the subject is an
# administrator, who may; a soft delete is allowed and a hard one is not. Which properties a
# real policy should trust from the PEP is its own choice: this one lets the request's
# properties mark a record archived (a restriction), and, because the fixture says so, lets
# a subject's "role" property make it an administrator.

actor user {}

resource record {
  roles = ["viewer", "editor"];
  permissions = ["read"];

  "viewer" if "editor";
  "read" if "viewer";
}

declare has_attribute(user, String, String);
declare has_attribute(record, String, String);

# Archived: as the request's resource properties say, or as the stored data says.
archived(_r: record) if context.resource.status = "archived";
archived(r: record) if has_attribute(r, "status", "archived");

# An administrator: as the request's subject properties say, or as the stored data says.
admin(_u: user) if context.subject.role = "admin";
admin(u: user) if has_attribute(u, "role", "admin");

# Rules 1 and 3: readers read.
allow(u: user, "read", r: record) if has_permission(u, "read", r);
# Rules 2, 4 and 5: editors write records that are not archived.
allow(u: user, "write", r: record) if has_role(u, "editor", r) and not archived(r);
# Rule 6: administrators write archived records.
allow(u: user, "write", r: record) if admin(u) and archived(r);
# Rules 7 and 8: editors delete softly, never for good.
allow(u: user, "delete", r: record) if has_role(u, "editor", r) and context.action.soft = true;

test "the eight fixture decisions" {
  setup {
    has_role(user{"alice"}, "editor", record{"record-1"});
    has_role(user{"alice"}, "editor", record{"record-2"});
    has_role(user{"bob"}, "viewer", record{"record-1"});
    has_attribute(user{"bob"}, "role", "admin");
    has_attribute(record{"record-1"}, "status", "active");
    has_attribute(record{"record-2"}, "status", "archived");
  }
  # Core: identifiers only.
  assert allow(user{"alice"}, "read", record{"record-1"});
  assert allow(user{"alice"}, "write", record{"record-1"});
  assert allow(user{"bob"}, "read", record{"record-1"});
  assert_not allow(user{"bob"}, "write", record{"record-1"});
  # Properties.
  assert_not allow(user{"alice"}, "write", record{"record-2"})
    with context {subject: {}, action: {}, resource: {status: "archived"}};
  assert allow(user{"bob"}, "write", record{"record-2"})
    with context {subject: {role: "admin"}, action: {}, resource: {status: "archived"}};
  assert allow(user{"alice"}, "delete", record{"record-1"})
    with context {subject: {}, action: {soft: true}, resource: {}};
  assert_not allow(user{"alice"}, "delete", record{"record-1"})
    with context {subject: {}, action: {soft: false}, resource: {}};
}

test "properties mark a record archived; they never unarchive one" {
  setup {
    has_role(user{"alice"}, "editor", record{"record-1"});
    has_role(user{"alice"}, "editor", record{"record-2"});
    has_attribute(record{"record-2"}, "status", "archived");
  }
  assert_not allow(user{"alice"}, "write", record{"record-1"})
    with context {subject: {}, action: {}, resource: {status: "archived"}};
  assert_not allow(user{"alice"}, "write", record{"record-2"})
    with context {subject: {}, action: {}, resource: {status: "active"}};
}

test "an administrator writes archived records only" {
  setup {
    has_attribute(user{"bob"}, "role", "admin");
    has_attribute(record{"record-1"}, "status", "active");
    has_attribute(record{"record-2"}, "status", "archived");
  }
  assert allow(user{"bob"}, "write", record{"record-2"});
  assert_not allow(user{"bob"}, "write", record{"record-1"});
  assert_not allow(user{"carol"}, "write", record{"record-2"});
}
