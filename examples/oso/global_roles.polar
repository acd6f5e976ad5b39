# Global roles: roles and permissions that hold everywhere, beside those on resources.

actor User {}

global {
  roles = ["superadmin", "auditor"];
  permissions = ["create_organization", "view_audit_log"];

  "create_organization" if "superadmin";
  "view_audit_log" if "auditor";
  "view_audit_log" if "superadmin";
}

resource Organization {
  roles = ["member", "admin"];
  permissions = ["read", "delete"];

  "admin" if global "superadmin";
  "member" if "admin";
  "read" if "member";
  "read" if global "auditor";
  "delete" if "admin";
}

test "a superadmin is admin of every organization and may create them" {
  setup {
    has_role(User{"root"}, "superadmin");
    has_role(User{"aud"}, "auditor");
  }
  assert allow(User{"root"}, "delete", Organization{"any"});
  assert has_permission(User{"root"}, "create_organization");
  assert has_permission(User{"aud"}, "view_audit_log");
  assert allow(User{"aud"}, "read", Organization{"any"});
  assert_not allow(User{"aud"}, "delete", Organization{"any"});
  assert_not has_permission(User{"aud"}, "create_organization");
}
