# GitClub: organizations own repositories, repositories hold issues.
# Roles on an organization flow down to its repositories and their issues.

actor User {}

resource Organization {
  roles = ["member", "admin"];
  permissions = ["read", "create_repository", "manage_members"];

  "read" if "member";
  "create_repository" if "member";
  "manage_members" if "admin";
  "member" if "admin";
}

resource Repository {
  roles = ["reader", "maintainer", "admin"];
  permissions = ["read", "push", "delete", "create_issue"];
  relations = { parent: Organization };

  "reader" if "member" on "parent";
  "admin" if "admin" on "parent";
  "reader" if "maintainer";
  "maintainer" if "admin";

  "read" if "reader";
  "read" if is_public(resource);
  "create_issue" if "reader";
  "push" if "maintainer";
  "delete" if "admin";
}

resource Issue {
  permissions = ["read", "comment", "close"];
  relations = { repository: Repository, creator: User };

  "read" if "read" on "repository";
  "comment" if "read" on "repository";
  "close" if "push" on "repository";
  "close" if "creator";
}

declare is_public(Repository);
declare is_blocked(User);

# A blocked user can do nothing, whatever roles they hold: deny wins over allow.
deny(user: User, _action: String, _resource: Resource) if is_blocked(user);

test "organization members read their repositories and issues" {
  setup {
    has_role(User{"alice"}, "member", Organization{"acme"});
    has_relation(Repository{"anvil"}, "parent", Organization{"acme"});
    has_relation(Issue{"i1"}, "repository", Repository{"anvil"});
  }
  assert allow(User{"alice"}, "read", Repository{"anvil"});
  assert allow(User{"alice"}, "comment", Issue{"i1"});
  assert_not allow(User{"alice"}, "push", Repository{"anvil"});
  assert_not allow(User{"alice"}, "close", Issue{"i1"});
  assert_not allow(User{"bob"}, "read", Repository{"anvil"});
}

test "organization admins administer every repository" {
  setup {
    has_role(User{"carol"}, "admin", Organization{"acme"});
    has_relation(Repository{"anvil"}, "parent", Organization{"acme"});
    has_relation(Issue{"i1"}, "repository", Repository{"anvil"});
  }
  assert allow(User{"carol"}, "delete", Repository{"anvil"});
  assert allow(User{"carol"}, "push", Repository{"anvil"});
  assert allow(User{"carol"}, "close", Issue{"i1"});
  assert allow(User{"carol"}, "manage_members", Organization{"acme"});
}

test "public repositories are readable by anyone" {
  setup {
    is_public(Repository{"gitclub"});
  }
  assert allow(User{"anyone"}, "read", Repository{"gitclub"});
  assert_not allow(User{"anyone"}, "push", Repository{"gitclub"});
}

test "issue creators may close their own issues" {
  setup {
    has_relation(Issue{"i2"}, "creator", User{"dave"});
  }
  assert allow(User{"dave"}, "close", Issue{"i2"});
  assert_not allow(User{"erin"}, "close", Issue{"i2"});
}

test "blocked users are denied even with roles" {
  setup {
    has_role(User{"mallory"}, "admin", Organization{"acme"});
    has_relation(Repository{"anvil"}, "parent", Organization{"acme"});
    is_blocked(User{"mallory"});
    is_public(Repository{"gitclub"});
  }
  assert_not allow(User{"mallory"}, "read", Repository{"anvil"});
  assert_not allow(User{"mallory"}, "read", Repository{"gitclub"});
  assert_not allow(User{"mallory"}, "manage_members", Organization{"acme"});
}
