# Multitenant RBAC: a role on an organization grants permissions on it and on the
# repositories it owns. Written as Oso Cloud writes it: no declarations, the default allow.

actor User {}

resource Organization {
  roles = ["viewer", "member", "owner"];
  permissions = [
    "read",
    "invite_members",
    "create_repository",
    "delete",
  ];

  "viewer" if "member";
  "member" if "owner";

  "read" if "viewer";
  "create_repository" if "member";
  "invite_members" if "owner";
  "delete" if "owner";
}

resource Repository {
  roles = ["reader", "writer", "maintainer"];
  permissions = ["read", "push", "configure"];
  relations = { organization: Organization };

  "reader" if "writer";
  "writer" if "maintainer";
  "reader" if "viewer" on "organization";
  "maintainer" if "owner" on "organization";

  "read" if "reader";
  "push" if "writer";
  "configure" if "maintainer";
}

test "organization roles reach the organization's repositories" {
  setup {
    has_role(User{"ines"}, "owner", Organization{"north"});
    has_role(User{"omar"}, "member", Organization{"north"});
    has_relation(Repository{"ledger"}, "organization", Organization{"north"});
  }
  assert allow(User{"ines"}, "configure", Repository{"ledger"});
  assert allow(User{"omar"}, "read", Repository{"ledger"});
  assert_not allow(User{"omar"}, "push", Repository{"ledger"});
  assert allow(User{"omar"}, "create_repository", Organization{"north"});
  assert_not allow(User{"omar"}, "invite_members", Organization{"north"});
  assert allow(User{"ines"}, action: String, Organization{"north"})
    iff action in ["read", "invite_members", "create_repository", "delete"];
}

test "a role on one repository stays on that repository" {
  setup {
    has_role(User{"tara"}, "writer", Repository{"ledger"});
    has_relation(Repository{"ledger"}, "organization", Organization{"north"});
    has_relation(Repository{"atlas"}, "organization", Organization{"north"});
  }
  assert allow(User{"tara"}, "push", Repository{"ledger"});
  assert_not allow(User{"tara"}, "read", Repository{"atlas"});
  assert_not allow(User{"tara"}, "read", Organization{"north"});
}
