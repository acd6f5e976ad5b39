# Conditional roles: a role counts only while a condition on the resource or the user holds.

actor User {}

resource Workspace {
  roles = ["guest", "member"];
  permissions = ["read", "comment"];

  "read" if "member";
  "comment" if "member";
  "read" if "guest";
}

# Guests comment only in workspaces that let them.
has_permission(user: User, "comment", ws: Workspace) if
  has_role(user, "guest", ws) and
  has_attribute(ws, "guests_may_comment", true);

# A member whose account is suspended holds no role at all.
deny(user: User, _: String, _: Workspace) if
  is_suspended(user, true);

# Archived workspaces are read-only, whatever the role.
deny(_: User, "comment", ws: Workspace) if
  has_attribute(ws, "archived", true);

test "guests comment only where allowed, and suspended users do nothing" {
  setup {
    has_role(User{"gil"}, "guest", Workspace{"open"});
    has_role(User{"gil"}, "guest", Workspace{"closed"});
    has_attribute(Workspace{"open"}, "guests_may_comment", true);
    has_attribute(Workspace{"closed"}, "guests_may_comment", false);
    has_role(User{"sam"}, "member", Workspace{"open"});
    is_suspended(User{"sam"}, true);
  }
  assert allow(User{"gil"}, "comment", Workspace{"open"});
  assert_not allow(User{"gil"}, "comment", Workspace{"closed"});
  assert allow(User{"gil"}, "read", Workspace{"closed"});
  assert_not allow(User{"sam"}, "read", Workspace{"open"});
}

test "archived workspaces refuse comments" {
  setup {
    has_role(User{"meg"}, "member", Workspace{"old"});
    has_attribute(Workspace{"old"}, "archived", true);
  }
  assert allow(User{"meg"}, "read", Workspace{"old"});
  assert_not allow(User{"meg"}, "comment", Workspace{"old"});
}
