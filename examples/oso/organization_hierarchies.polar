# Organization hierarchies: roles on a parent organization apply to its children, and an
# organization's roles apply to the teams inside it.

actor User {}

resource Organization {
  roles = ["member", "admin",];
  permissions = ["read", "add_member", "delete",];
  relations = { parent: Organization, };

  role if role on "parent";
  "member" if "admin";

  "read" if "member";
  "add_member" if "admin";
  "delete" if "admin";
}

resource Team {
  roles = ["member", "lead"];
  permissions = ["read", "edit"];
  relations = { organization: Organization };

  "member" if "member" on "organization";
  "lead" if "admin" on "organization";
  "member" if "lead";

  "read" if "member";
  "edit" if "lead";
}

test "an admin of the holding company administers its subsidiaries and their teams" {
  setup {
    has_relation(Organization{"emea"}, "parent", Organization{"holding"});
    has_relation(Organization{"france"}, "parent", Organization{"emea"});
    has_relation(Team{"paris-ops"}, "organization", Organization{"france"});
    has_role(User{"noor"}, "admin", Organization{"holding"});
    has_role(User{"luc"}, "member", Organization{"france"});
  }
  assert allow(User{"noor"}, "delete", Organization{"france"});
  assert allow(User{"noor"}, "edit", Team{"paris-ops"});
  assert allow(User{"luc"}, "read", Team{"paris-ops"});
  assert_not allow(User{"luc"}, "edit", Team{"paris-ops"});
  assert_not allow(User{"luc"}, "read", Organization{"emea"});
}
