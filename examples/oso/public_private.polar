# Public and private resources: anyone may read a public document; a private one needs a role.

actor User {}

resource Document {
  roles = ["reader", "editor"];
  permissions = ["read", "edit"];

  "reader" if "editor";
  "read" if "reader";
  "edit" if "editor";
  "read" if is_public(resource);
}

# A status page is always public, whoever asks.
has_permission(_: User, "read", _: StatusPage) if true;
# and nobody edits it through this policy.
has_permission(_: User, "edit", _: StatusPage) if false;

resource StatusPage {
  permissions = ["read", "edit"];
}

test "public documents are readable by anyone, private ones by their readers" {
  setup {
    is_public(Document{"handbook"});
    has_role(User{"val"}, "reader", Document{"salaries"});
  }
  assert allow(User{"anyone"}, "read", Document{"handbook"});
  assert_not allow(User{"anyone"}, "edit", Document{"handbook"});
  assert_not allow(User{"anyone"}, "read", Document{"salaries"});
  assert allow(User{"val"}, "read", Document{"salaries"});
  assert allow(User{"anyone"}, "read", StatusPage{"main"});
  assert_not allow(User{"anyone"}, "edit", StatusPage{"main"});
}
