# User groups: roles are held by groups (which are not actors), and users hold what their
# groups hold. Groups can sit inside other groups.

actor User {}

resource Group {
  relations = { parent: Group };
}

resource Repository {
  roles = ["reader", "maintainer"];
  permissions = ["read", "push"];

  "reader" if "maintainer";
  "read" if "reader";
  "push" if "maintainer";
}

in_group(user: User, group: Group) if has_group(user, group);
in_group(user: User, group: Group) if
  inner matches Group and
  has_group(user, inner) and
  in_nested(inner, group);

in_nested(inner: Group, outer: Group) if has_relation(inner, "parent", outer);
in_nested(inner: Group, outer: Group) if
  middle matches Group and
  has_relation(inner, "parent", middle) and
  in_nested(middle, outer);

has_role(user: User, role: String, repo: Repository) if
  group matches Group and
  in_group(user, group) and
  has_role(group, role, repo);

test "members of a group, directly or through nested groups, hold its roles" {
  setup {
    has_group(User{"ali"}, Group{"backend"});
    has_relation(Group{"backend"}, "parent", Group{"engineering"});
    has_role(Group{"engineering"}, "reader", Repository{"monorepo"});
    has_role(Group{"backend"}, "maintainer", Repository{"api"});
  }
  assert allow(User{"ali"}, "read", Repository{"monorepo"});
  assert_not allow(User{"ali"}, "push", Repository{"monorepo"});
  assert allow(User{"ali"}, "push", Repository{"api"});
  assert_not allow(User{"bob"}, "read", Repository{"monorepo"});
}
