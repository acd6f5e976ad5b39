# Time-based checks: access that ends at a moment stored with the grant, compared with the
# time of the check (@current_unix_time, seconds since 1970).

actor User {}

resource Repository {
  roles = ["member"];
  permissions = ["read", "write"];

  "read" if "member";
  "write" if "member";
}

# A role that holds until its expiry.
has_role(user: User, role: String, repo: Repository) if
  expiry matches Integer and
  has_role_with_expiry(user, role, repo, expiry) and
  @current_unix_time < expiry;

# A repository frozen after a date can still be read, but no longer written.
deny(_: User, "write", repo: Repository) if
  frozen_at matches Integer and
  frozen_after(repo, frozen_at) and
  @current_unix_time >= frozen_at;

test "a grant works until it expires" {
  setup {
    # 4102444800 is 2100-01-01; 946684800 is 2000-01-01.
    has_role_with_expiry(User{"kim"}, "member", Repository{"api"}, 4102444800);
    has_role_with_expiry(User{"lee"}, "member", Repository{"api"}, 946684800);
  }
  assert allow(User{"kim"}, "read", Repository{"api"});
  assert_not allow(User{"lee"}, "read", Repository{"api"});
}

test "a frozen repository refuses writes, not reads" {
  setup {
    has_role(User{"kim"}, "member", Repository{"old"});
    frozen_after(Repository{"old"}, 946684800);
  }
  assert allow(User{"kim"}, "read", Repository{"old"});
  assert_not allow(User{"kim"}, "write", Repository{"old"});
}
