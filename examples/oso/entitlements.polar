# Entitlements: what an organization may do depends on its members' roles and on the plan it
# pays for, including a quota per feature.

actor User {}

resource Organization {
  roles = ["member", "admin"];
  permissions = ["project.create", "sso.configure"];

  "member" if "admin";
}

resource Plan {
  roles = ["subscriber"];
  relations = { subscriber_organization: Organization };

  "subscriber" if role on "subscriber_organization";
}

resource Feature {}

declare plan_limit(Plan, Feature, Integer);
declare projects_used(Organization, Integer);

# The plans, written in the policy; more can be stored as facts.
plan_limit(Plan{"free"}, Feature{"projects"}, 3);
plan_limit(Plan{"team"}, Feature{"projects"}, 50);
plan_includes(Plan{"team"}, Feature{"sso"});

has_permission(user: User, "project.create", org: Organization) if
  has_role(user, "member", org) and
  below_limit(org, Feature{"projects"});

has_permission(user: User, "sso.configure", org: Organization) if
  has_role(user, "admin", org) and
  plan matches Plan and
  has_relation(plan, "subscriber_organization", org) and
  plan_includes(plan, Feature{"sso"});

below_limit(org: Organization, feature: Feature) if
  plan matches Plan and
  has_relation(plan, "subscriber_organization", org) and
  limit matches Integer and
  plan_limit(plan, feature, limit) and
  used matches Integer and
  projects_used(org, used) and
  used < limit;

test "members create projects until the plan's quota is used" {
  setup {
    has_role(User{"mia"}, "member", Organization{"small"});
    has_role(User{"max"}, "admin", Organization{"big"});
    has_relation(Plan{"free"}, "subscriber_organization", Organization{"small"});
    has_relation(Plan{"team"}, "subscriber_organization", Organization{"big"});
    projects_used(Organization{"small"}, 3);
    projects_used(Organization{"big"}, 3);
  }
  assert_not allow(User{"mia"}, "project.create", Organization{"small"});
  assert allow(User{"max"}, "project.create", Organization{"big"});
  assert allow(User{"max"}, "sso.configure", Organization{"big"});
  assert has_role(User{"max"}, "subscriber", Plan{"team"});
  assert_not has_role(User{"mia"}, "subscriber", Plan{"team"});
}

test "a free plan has no single sign-on" {
  setup {
    has_role(User{"ann"}, "admin", Organization{"small"});
    has_relation(Plan{"free"}, "subscriber_organization", Organization{"small"});
    projects_used(Organization{"small"}, 0);
  }
  assert allow(User{"ann"}, "project.create", Organization{"small"});
  assert_not allow(User{"ann"}, "sso.configure", Organization{"small"});
}
