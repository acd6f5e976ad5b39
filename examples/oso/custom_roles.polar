# Custom roles: an organization's administrators define roles of their own (Role entities)
# and say which permissions each grants. Users hold a Role entity on an organization, a
# shape of has_role that only the rules below imply.

actor User {}

resource Role {}

resource Organization {
  roles = ["admin", "member"];
  permissions = ["read", "update", "manage_billing", "manage_roles"];

  "member" if "admin";
  "read" if "member";
  "update" if "admin";
  "manage_billing" if "admin";
  "manage_roles" if "admin";
}

# A custom role grants what its definition lists, on the organization it is held on.
has_permission(user: User, permission: String, org: Organization) if
  role matches Role and
  has_role(user, role, org) and
  grants_permission(role, permission);

test fixture billing_role {
  grants_permission(Role{"billing"}, "read");
  grants_permission(Role{"billing"}, "manage_billing");
}

test "a custom role grants exactly the permissions it lists" {
  setup {
    fixture billing_role;
    has_role(User{"bea"}, Role{"billing"}, Organization{"acme"});
  }
  assert allow(User{"bea"}, "manage_billing", Organization{"acme"});
  assert allow(User{"bea"}, permission: String, Organization{"acme"})
    iff permission in ["read", "manage_billing"];
  assert_not allow(User{"bea"}, "manage_billing", Organization{"other"});
}

test "built-in roles still work beside custom ones" {
  setup {
    fixture billing_role;
    has_role(User{"ada"}, "admin", Organization{"acme"});
  }
  assert allow(User{"ada"}, "manage_roles", Organization{"acme"});
  assert_not allow(User{"bea"}, "read", Organization{"acme"});
}
