# Adaptive rules on an agent's behaviour (docs/signals.md): a bulk-delete guard, an
# exfiltration guard, and a new rule monitored in shadow mode before it is enforced.
#
# The gateway fills context.behavior.<scope>.<counter>.<window> with {count, baseline, ratio}:
# scope user, agent or tool (this agent on this tool); counter calls, refusals, destructive,
# bytes or targets; window minute, ten_minutes or hour.

actor User {}
actor Agent {}

resource McpServer {
  roles = ["user"];
}

resource Tool {
  permissions = ["call", "list"];
  relations = { server: McpServer };
  "call" if "user" on "server";
  "list" if "user" on "server";
}

allow(actor, action, resource) if has_permission(actor, action, resource);
allow(_agent: Agent, action, _tool: Tool) if action in ["call", "list"];

# Bulk deletion: more than 10 destructive calls by one agent in a minute; the next ones wait
# for a person's approval.
bulk_delete(_user: User, "call", _tool: Tool) if
  context.annotations.destructiveHint = true and
  context.behavior.agent.destructive.minute.count > 10;
requires_approval(user: User, "call", tool: Tool) if bulk_delete(user, "call", tool);

# Exfiltration: results far above what this agent usually gets from this tool (five times its
# baseline, and more than 1 MB in a minute): customer emails are masked and the agent slowed to
# one call a minute.
exfiltration(_user: User, "call", _tool: Tool) if
  context.behavior.tool.bytes.minute.ratio > 5 and
  context.behavior.tool.bytes.minute.count > 1000000;
mask(user: User, "call", tool: Tool, "customers.*.email") if exfiltration(user, "call", tool);
rate_limit(user: User, "call", tool: Tool, 1, 60) if exfiltration(user, "call", tool);

# Scanning, monitored first: an agent touching more than 50 distinct tools in ten minutes
# would be refused; recorded in the decision record (obligations.shadow) and counted in
# bastion_shadow_would_total, not enforced. `bastion signals shadow-report` shows how often it
# would have fired, and for whom; once calibrated, turn it into a deny rule.
scanning(agent: Agent) if context.behavior.agent.targets.ten_minutes.count > 50;
would(agent: Agent, "call", _tool: Tool, "deny", "scanning") if scanning(agent);

test "the eleventh delete in a minute waits for approval" {
  setup {
    has_role(User{"sam"}, "user", McpServer{"desk"});
    has_relation(Tool{"desk/delete_customer"}, "server", McpServer{"desk"});
  }
  assert allow(User{"sam"}, "call", Tool{"desk/delete_customer"});
  assert_not requires_approval(User{"sam"}, "call", Tool{"desk/delete_customer"}) with context {
    annotations: {destructiveHint: true},
    behavior: {agent: {destructive: {minute: {count: 10, baseline: 2.0, ratio: 5.0}}}}
  };
  assert requires_approval(User{"sam"}, "call", Tool{"desk/delete_customer"}) with context {
    annotations: {destructiveHint: true},
    behavior: {agent: {destructive: {minute: {count: 11, baseline: 2.0, ratio: 5.5}}}}
  };
  assert_not requires_approval(User{"sam"}, "call", Tool{"desk/search_customers"}) with context {
    annotations: {readOnlyHint: true},
    behavior: {agent: {destructive: {minute: {count: 11, baseline: 2.0, ratio: 5.5}}}}
  };
}

test "results far above the baseline are masked and throttled" {
  setup {
    has_role(User{"sam"}, "user", McpServer{"desk"});
    has_relation(Tool{"desk/search_customers"}, "server", McpServer{"desk"});
  }
  assert mask(User{"sam"}, "call", Tool{"desk/search_customers"}, "customers.*.email") with context {
    behavior: {tool: {bytes: {minute: {count: 2000000, baseline: 100000.0, ratio: 20.0}}}}
  };
  assert rate_limit(User{"sam"}, "call", Tool{"desk/search_customers"}, 1, 60) with context {
    behavior: {tool: {bytes: {minute: {count: 2000000, baseline: 100000.0, ratio: 20.0}}}}
  };
  # A big answer that is usual for this agent is not exfiltration.
  assert_not mask(User{"sam"}, "call", Tool{"desk/search_customers"}, "customers.*.email") with context {
    behavior: {tool: {bytes: {minute: {count: 2000000, baseline: 1500000.0, ratio: 1.333}}}}
  };
}

test "scanning is monitored, never enforced" {
  setup {
    has_role(User{"sam"}, "user", McpServer{"desk"});
    has_relation(Tool{"desk/search_customers"}, "server", McpServer{"desk"});
  }
  assert would(Agent{"bot"}, "call", Tool{"desk/search_customers"}, "deny", "scanning") with context {
    behavior: {agent: {targets: {ten_minutes: {count: 51, baseline: 3.0, ratio: 17.0}}}}
  };
  assert allow(Agent{"bot"}, "call", Tool{"desk/search_customers"}) with context {
    behavior: {agent: {targets: {ten_minutes: {count: 51, baseline: 3.0, ratio: 17.0}}}}
  };
}
