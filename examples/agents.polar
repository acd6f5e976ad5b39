# AI agents calling tools: roles give access, tool attributes and the request's context narrow it.

actor User {}
actor Agent {}

global {
  roles = ["admin"];
}

resource Team {
  roles = ["member", "lead"];
  "member" if "lead";
}

resource Tool {
  permissions = ["call", "list"];
  relations = { team: Team };

  "list" if "member" on "team";
  "call" if "member" on "team";
  "call" if global "admin";
  "list" if global "admin";
}

declare has_attribute(Tool, String, String);
declare trusted_agent(Agent);

# Agents act for users: an agent may call what its registration allows.
allow(agent: Agent, "call", tool: Tool) if trusted_agent(agent) and has_attribute(tool, "risk", "low");
allow(agent: Agent, "list", _tool: Tool) if trusted_agent(agent);

# People: permissions from roles, but high-risk tools need a team lead, a managed device, and
# business hours in the team's time zone.
allow(user: User, action: String, tool: Tool) if
  has_permission(user, action, tool) and
  not has_attribute(tool, "risk", "high");

allow(user: User, "call", tool: Tool) if
  has_attribute(tool, "risk", "high") and
  has_relation(tool, "team", team) and
  has_role(user, "lead", team) and
  context.device.managed = true and
  in_time_window(context.time, "Mon-Fri", "09:00", "17:00", "Europe/Paris");

# Guardrails: large payments never go through an agent alone; requests from outside the
# corporate network are refused.
deny(_actor, "call", tool: Tool) if
  has_attribute(tool, "kind", "payment") and
  context.arguments.amount > 1000;

deny(_actor, _action, _resource) if
  not cidr_contains("10.0.0.0/8", context.client.ip);

test "team members call low-risk tools from the office network" {
  setup {
    has_role(User{"alice"}, "member", Team{"support"});
    has_relation(Tool{"crm/search"}, "team", Team{"support"});
    has_attribute(Tool{"crm/search"}, "risk", "low");
  }
  assert allow(User{"alice"}, "call", Tool{"crm/search"}) with context {client: {ip: "10.1.2.3"}};
  assert_not allow(User{"alice"}, "call", Tool{"crm/search"}) with context {client: {ip: "203.0.113.9"}};
  assert_not allow(User{"alice"}, "call", Tool{"crm/search"});
}

test "high-risk tools need a lead, a managed device and business hours" {
  setup {
    has_role(User{"alice"}, "member", Team{"support"});
    has_role(User{"bob"}, "lead", Team{"support"});
    has_relation(Tool{"crm/delete"}, "team", Team{"support"});
    has_attribute(Tool{"crm/delete"}, "risk", "high");
  }
  # Monday 2026-11-30 10:00 in Paris is 09:00 UTC.
  assert allow(User{"bob"}, "call", Tool{"crm/delete"})
    with context {time: "2026-11-30T09:00:00Z", device: {managed: true}, client: {ip: "10.0.0.7"}};
  assert_not allow(User{"alice"}, "call", Tool{"crm/delete"})
    with context {time: "2026-11-30T09:00:00Z", device: {managed: true}, client: {ip: "10.0.0.7"}};
  assert_not allow(User{"bob"}, "call", Tool{"crm/delete"})
    with context {time: "2026-11-30T09:00:00Z", device: {managed: false}, client: {ip: "10.0.0.7"}};
  # Saturday.
  assert_not allow(User{"bob"}, "call", Tool{"crm/delete"})
    with context {time: "2026-11-28T09:00:00Z", device: {managed: true}, client: {ip: "10.0.0.7"}};
  # 18:30 in Paris.
  assert_not allow(User{"bob"}, "call", Tool{"crm/delete"})
    with context {time: "2026-11-30T17:30:00Z", device: {managed: true}, client: {ip: "10.0.0.7"}};
}

test "payments over the limit are denied even to admins" {
  setup {
    has_role(User{"root"}, "admin");
    has_attribute(Tool{"billing/pay"}, "kind", "payment");
  }
  assert allow(User{"root"}, "call", Tool{"billing/pay"})
    with context {arguments: {amount: 500}, client: {ip: "10.0.0.1"}};
  assert_not allow(User{"root"}, "call", Tool{"billing/pay"})
    with context {arguments: {amount: 5000}, client: {ip: "10.0.0.1"}};
}

test "trusted agents call only low-risk tools" {
  setup {
    trusted_agent(Agent{"claims-bot"});
    has_attribute(Tool{"crm/search"}, "risk", "low");
    has_attribute(Tool{"crm/delete"}, "risk", "high");
  }
  assert allow(Agent{"claims-bot"}, "call", Tool{"crm/search"}) with context {client: {ip: "10.9.9.9"}};
  assert_not allow(Agent{"claims-bot"}, "call", Tool{"crm/delete"}) with context {client: {ip: "10.9.9.9"}};
  assert_not allow(Agent{"rogue"}, "call", Tool{"crm/search"}) with context {client: {ip: "10.9.9.9"}};
}
