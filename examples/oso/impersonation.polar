# Impersonation: support staff may act as a customer while they impersonate them. Users are
# resources too, so a permission ("impersonate") can be held on a user.

actor User {
  permissions = ["impersonate"];

  "impersonate" if global "support";
}

global {
  roles = ["support"];
}

resource Account {
  roles = ["owner", "member"];
  permissions = ["read", "update"];

  "member" if "owner";
  "read" if "member";
  "update" if "owner";
}

# Whoever may impersonate a user, and is doing so now, may do what that user may do.
allow(user: User, action: String, resource: Resource) if
  customer matches User and
  has_permission(user, "impersonate", customer) and
  is_impersonating(user, customer) and
  has_permission(customer, action, resource);

# Our own allow rule replaces the default one, so it is written out.
allow(user: User, action: String, resource: Resource) if
  has_permission(user, action, resource);

test "support staff act as the customer they impersonate, and only then" {
  setup {
    has_role(User{"sue"}, "support");
    has_role(User{"carl"}, "owner", Account{"carl-co"});
    is_impersonating(User{"sue"}, User{"carl"});
    is_impersonating(User{"mallory"}, User{"carl"});
  }
  assert allow(User{"sue"}, "update", Account{"carl-co"});
  assert allow(User{"sue"}, "impersonate", User{"carl"});
  # Impersonating without the permission to do so grants nothing.
  assert_not allow(User{"mallory"}, "read", Account{"carl-co"});
  assert_not allow(User{"carl"}, "impersonate", User{"sue"});
}

test "permissions held directly are facts too" {
  setup {
    has_permission(User{"dee"}, "impersonate", User{"carl"});
    is_impersonating(User{"dee"}, User{"carl"});
    has_role(User{"carl"}, "member", Account{"carl-co"});
  }
  assert allow(User{"dee"}, "read", Account{"carl-co"});
  assert_not allow(User{"dee"}, "update", Account{"carl-co"});
}
