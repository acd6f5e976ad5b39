# The quickstart policy: who may do what on the customer desk MCP server ("desk").
#
# RBAC:  a role on the server (admin) or on a team (member).
# ReBAC: the server belongs to the support team, so the team's members may use it; tools belong
#        to the server.
# ABAC:  the tool's annotations, the time of day and the token's scopes decide the rest.

actor User {}
actor Agent {}

resource Team {
  roles = ["member", "lead"];
  "member" if "lead";
}

resource McpServer {
  roles = ["user", "admin"];
  permissions = ["connect"];
  relations = { team: Team };

  "user" if "admin";
  "user" if "member" on "team";
  "connect" if "user";
}

resource Tool {
  permissions = ["list"];
  relations = { server: McpServer };
  "list" if "user" on "server";
}

resource McpResource {
  permissions = ["list", "read"];
  relations = { server: McpServer };
  "list" if "user" on "server";
  "read" if "user" on "server";
}

resource Prompt {
  permissions = ["list", "get"];
  relations = { server: McpServer };
  "list" if "user" on "server";
  "get" if "user" on "server";
}

declare has_attribute(McpResource, String, String);
declare has_attribute(Tool, String, String);
declare blocked(Agent);

allow(actor, action, resource) if has_permission(actor, action, resource);

# Read-only tools: every user of the server.
allow(user: User, "call", tool: Tool) if
  has_relation(tool, "server", server) and
  has_role(user, "user", server) and
  context.annotations.readOnlyHint = true;

# Email leaves the company: users of the server; outside business hours it waits for an admin's
# approval (below).
allow(user: User, "call", tool: Tool) if
  context.annotations.openWorldHint = true and
  has_relation(tool, "server", server) and
  has_role(user, "user", server);

# Admins call every tool of their server, destructive ones included.
allow(user: User, "call", tool: Tool) if
  has_relation(tool, "server", server) and
  has_role(user, "admin", server);

# Internal notes are for admins: not listed to others, and what another user's agent reads of
# them is held until an admin reviews it (below).
deny(user: User, "list", resource: McpResource) if
  has_attribute(resource, "audience", "admin") and
  has_relation(resource, "server", server) and
  not has_role(user, "admin", server);

# Agents (OAuth clients) act within what their user may do (every message is decided for the
# user and for the agent), unless an administrator blocks one.
allow(agent: Agent, "connect", server: McpServer) if
  has_relation(server, "team", _team) and not blocked(agent);
allow(agent: Agent, action, tool: Tool) if
  action in ["list", "call"] and has_relation(tool, "server", _server) and not blocked(agent);
allow(agent: Agent, action, resource: McpResource) if
  action in ["list", "read"] and has_relation(resource, "server", _server) and not blocked(agent);
allow(agent: Agent, action, prompt: Prompt) if
  action in ["list", "get"] and has_relation(prompt, "server", _server) and not blocked(agent);

# Obligations.

# People in the loop (docs/approvals.md). Deleting a customer waits for the user's own
# confirmation: no approver rule names anyone else for it, so the user answers for their agent.
requires_approval(_user: User, "call", Tool{"desk/delete_customer"});

# Email outside business hours waits for an admin of the server, who may approve that one email
# or the tool for up to an hour (an approval_grant fact with an expiry).
requires_approval(user: User, "call", tool: Tool) if
  context.annotations.openWorldHint = true and
  has_relation(tool, "server", server) and
  not has_role(user, "admin", server) and
  not in_time_window(context.time, "Mon-Fri", "09:00", "18:00", "Europe/Paris");
approver(admin: User, _user: User, "call", Tool{"desk/send_email"}) if
  has_role(admin, "admin", McpServer{"desk"});
approval_window(_user: User, "call", Tool{"desk/send_email"}, 60);
declare approval_grant(User, Agent, String, Tool);

# What a non-admin reads of internal notes is held for an admin to release or withhold.
requires_review(user: User, "read", resource: McpResource) if
  has_attribute(resource, "audience", "admin") and
  has_relation(resource, "server", server) and
  not has_role(user, "admin", server);
approver(admin: User, _user: User, "read", resource: McpResource) if
  has_attribute(resource, "audience", "admin") and
  has_relation(resource, "server", server) and
  has_role(admin, "admin", server);
requires_scope("call", _tool: Tool, "customers:write") if
  context.annotations.destructiveHint = true;

# Customer emails are for admins: masked in whatever a non-admin gets customer records from,
# a tool or a resource alike (each labelled in desk.facts with the data it holds).
mask(user: User, action, resource, "customers.*.email") if
  action in ["call", "read", "get"] and
  has_attribute(resource, "holds", "customers") and
  has_relation(resource, "server", server) and
  not has_role(user, "admin", server);

# A mask redacts what comes back; it does not stop a value being used as input. Searching by
# email would confirm a guessed address (one customer found, or none), so non-admins may not.
deny(user: User, "call", tool: Tool) if
  context.tool = "search_customers" and
  context.arguments.field = "email" and
  has_relation(tool, "server", server) and
  not has_role(user, "admin", server);

# Limits compose: every principal's limit applies, each counted on its own, so the lowest wins.
# Each agent (OAuth client) sends at most 5 emails a minute, and a user at most 8 across all their
# agents: registering another client buys no more.
rate_limit(_agent: Agent, "call", _tool: Tool, 5, 60) if
  context.annotations.openWorldHint = true;
rate_limit(_user: User, "call", _tool: Tool, 8, 60) if
  context.annotations.openWorldHint = true;

test "support agents see emails masked, cannot search by email or delete, email out of hours waits for approval" {
  setup {
    has_role(User{"sam"}, "member", Team{"support"});
    has_relation(McpServer{"desk"}, "team", Team{"support"});
    has_relation(Tool{"desk/search_customers"}, "server", McpServer{"desk"});
    has_relation(Tool{"desk/delete_customer"}, "server", McpServer{"desk"});
    has_relation(Tool{"desk/send_email"}, "server", McpServer{"desk"});
    has_relation(McpResource{"desk/customers://directory"}, "server", McpServer{"desk"});
    has_attribute(Tool{"desk/search_customers"}, "holds", "customers");
    has_attribute(McpResource{"desk/customers://directory"}, "holds", "customers");
  }
  assert allow(User{"sam"}, "connect", McpServer{"desk"});
  assert mask(User{"sam"}, "read", McpResource{"desk/customers://directory"}, "customers.*.email");
  assert allow(User{"sam"}, "list", Tool{"desk/delete_customer"});
  assert allow(User{"sam"}, "call", Tool{"desk/search_customers"})
    with context {annotations: {readOnlyHint: true}};
  assert mask(User{"sam"}, "call", Tool{"desk/search_customers"}, "customers.*.email")
    with context {tool: "search_customers"};
  assert_not allow(User{"sam"}, "call", Tool{"desk/search_customers"})
    with context {tool: "search_customers", annotations: {readOnlyHint: true},
                  arguments: {query: "ada@", field: "email"}};
  assert_not allow(User{"sam"}, "call", Tool{"desk/delete_customer"})
    with context {annotations: {destructiveHint: true}};
  # Monday 2026-11-30, 10:00 in Paris (09:00 UTC); then 20:00 in Paris; then a Sunday.
  assert allow(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {annotations: {openWorldHint: true}, time: "2026-11-30T09:00:00Z"};
  assert_not requires_approval(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {annotations: {openWorldHint: true}, time: "2026-11-30T09:00:00Z"};
  assert allow(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {annotations: {openWorldHint: true}, time: "2026-11-30T19:00:00Z"};
  assert requires_approval(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {annotations: {openWorldHint: true}, time: "2026-11-30T19:00:00Z"};
  assert requires_approval(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {annotations: {openWorldHint: true}, time: "2026-11-29T09:00:00Z"};
}

test "admins delete, see emails and read internal notes; others do not" {
  setup {
    has_role(User{"avery"}, "admin", McpServer{"desk"});
    has_role(User{"sam"}, "member", Team{"support"});
    has_relation(McpServer{"desk"}, "team", Team{"support"});
    has_relation(Tool{"desk/delete_customer"}, "server", McpServer{"desk"});
    has_relation(Tool{"desk/search_customers"}, "server", McpServer{"desk"});
    has_attribute(Tool{"desk/search_customers"}, "holds", "customers");
    has_relation(McpResource{"desk/customers://audit-notes"}, "server", McpServer{"desk"});
    has_attribute(McpResource{"desk/customers://audit-notes"}, "audience", "admin");
  }
  assert allow(User{"avery"}, "call", Tool{"desk/delete_customer"})
    with context {annotations: {destructiveHint: true}};
  assert requires_scope("call", Tool{"desk/delete_customer"}, "customers:write")
    with context {annotations: {destructiveHint: true}};
  assert_not mask(User{"avery"}, "call", Tool{"desk/search_customers"}, "customers.*.email")
    with context {tool: "search_customers"};
  assert allow(User{"avery"}, "call", Tool{"desk/search_customers"})
    with context {tool: "search_customers", annotations: {readOnlyHint: true},
                  arguments: {query: "ada@", field: "email"}};
  assert allow(User{"avery"}, "read", McpResource{"desk/customers://audit-notes"});
  assert_not requires_review(User{"avery"}, "read", McpResource{"desk/customers://audit-notes"});
  assert_not allow(User{"sam"}, "list", McpResource{"desk/customers://audit-notes"});
  assert requires_review(User{"sam"}, "read", McpResource{"desk/customers://audit-notes"});
  assert approver(User{"avery"}, User{"sam"}, "read", McpResource{"desk/customers://audit-notes"});
  assert_not approver(User{"sam"}, User{"sam"}, "read", McpResource{"desk/customers://audit-notes"});
  # Deleting waits for the user's own confirmation: nobody else is named to approve it.
  assert requires_approval(User{"avery"}, "call", Tool{"desk/delete_customer"});
  assert_not approver(User{"avery"}, User{"avery"}, "call", Tool{"desk/delete_customer"});
}

test "agents act within their user's rights unless blocked" {
  setup {
    blocked(Agent{"rogue"});
    has_relation(Tool{"desk/search_customers"}, "server", McpServer{"desk"});
  }
  assert allow(Agent{"claude"}, "call", Tool{"desk/search_customers"});
  assert_not allow(Agent{"rogue"}, "call", Tool{"desk/search_customers"});
}
