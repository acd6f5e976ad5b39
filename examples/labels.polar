# Information-flow labels (docs/delegation.md): what an agent has been shown decides where it
# may send things.
#
# A label(<target>, "<label>") fact marks a tool, resource or prompt. When the gateway releases
# a result of that target, its labels join the caller's label set, kept per user, first agent of
# the chain (a sub-agent shares its parent's) and task; rules read the set as
# context.session.labels, a list of strings.

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

resource McpResource {
  permissions = ["read", "list"];
  relations = { server: McpServer };
  "read" if "user" on "server";
  "list" if "user" on "server";
}

declare label(Tool, String);
declare label(McpResource, String);

allow(actor, action, resource) if has_permission(actor, action, resource);
allow(_agent: Agent, action, _tool: Tool) if action in ["call", "list"];
allow(_agent: Agent, action, _resource: McpResource) if action in ["read", "list"];

# Once personal data was seen, mail goes only to the company's own addresses (whatever their
# case); an address that is not a string is refused too.
deny(_actor, "call", Tool{"desk/send_email"}) if
  "pii" in context.session.labels and
  lower(context.arguments.to, to) and
  not ends_with(to, "@acme.example");
deny(_actor, "call", Tool{"desk/send_email"}) if
  "pii" in context.session.labels and
  not lower(context.arguments.to, _to);

# Once confidential notes were read, nothing is posted to the public web at all.
deny(_actor, "call", Tool{"web/post"}) if "confidential" in context.session.labels;

test "an agent shown personal data mails only inside the company" {
  setup {
    has_role(User{"sam"}, "user", McpServer{"desk"});
    has_relation(Tool{"desk/send_email"}, "server", McpServer{"desk"});
    label(Tool{"desk/search_customers"}, "pii");
  }
  assert label(Tool{"desk/search_customers"}, "pii");
  assert allow(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {session: {labels: []}, arguments: {to: "someone@elsewhere.example"}};
  assert_not allow(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {session: {labels: ["pii"]}, arguments: {to: "someone@elsewhere.example"}};
  assert allow(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {session: {labels: ["pii"]}, arguments: {to: "Ann@ACME.example"}};
  assert_not allow(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {session: {labels: ["pii"]}, arguments: {to: "ann@acme.example.evil.test"}};
  assert_not allow(User{"sam"}, "call", Tool{"desk/send_email"})
    with context {session: {labels: ["pii"]}, arguments: {to: 42}};
}

test "confidential notes keep everything off the public web" {
  setup {
    has_role(User{"sam"}, "user", McpServer{"web"});
    has_relation(Tool{"web/post"}, "server", McpServer{"web"});
    label(McpResource{"desk/customers://audit-notes"}, "confidential");
  }
  assert allow(User{"sam"}, "call", Tool{"web/post"}) with context {session: {labels: ["pii"]}};
  assert_not allow(User{"sam"}, "call", Tool{"web/post"})
    with context {session: {labels: ["confidential"]}};
}
