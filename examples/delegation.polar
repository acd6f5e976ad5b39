# Delegation between agents (docs/delegation.md): a person's coding agent hands SVG work to an
# illustrator sub-agent by token exchange (RFC 8693). The sub-agent works in the folders the
# facts give it, with the scopes that survive the delegation now: while the person's device is
# reported out of compliance, a delegated token carries the reads and none of the writes.
#
# Every call of a delegated token is decided for the person, the coding agent and the
# sub-agent: each must be allowed, so none of them exceeds the one it acts for.

actor User {}
actor Agent {}

resource McpServer {
  roles = ["designer", "publisher", "coder", "illustrator"];
  permissions = ["connect"];
  "designer" if "publisher";
  "connect" if "designer";
  "connect" if "coder";
  "connect" if "illustrator";
}

resource Tool {
  permissions = ["list"];
  relations = { server: McpServer };
  "list" if "connect" on "server";
}

declare may_use_folder(Agent, String);
declare signal(User, String, Boolean, String, Integer);

allow(actor, action, resource) if has_permission(actor, action, resource);

# People: designers call the studio's tools; only publishers publish.
allow(user: User, "call", tool: Tool) if
  has_relation(tool, "server", server) and
  has_role(user, "designer", server) and
  not tool = Tool{"studio/publish"};
allow(user: User, "call", tool: Tool) if
  has_relation(tool, "server", server) and
  has_role(user, "publisher", server);

# Coding agents call every tool of their server (within what their person may do).
allow(agent: Agent, "call", tool: Tool) if
  has_relation(tool, "server", server) and
  has_role(agent, "coder", server);

# Coding agents keep out of the archive (a sub-agent given it still cannot write there for one).
deny(agent: Agent, "call", _tool: Tool) if
  has_role(agent, "coder", _server) and
  context.arguments.folder = "archive";

# Illustrators work only in the folders given to them.
allow(agent: Agent, "call", tool: Tool) if
  has_relation(tool, "server", server) and
  has_role(agent, "illustrator", server) and
  may_use_folder(agent, context.arguments.folder);

# Scopes each tool needs (a token without one gets 403 insufficient_scope).
requires_scope("call", Tool{"studio/read_file"}, "files:read");
requires_scope("call", Tool{"studio/write_svg"}, "svg:write");
requires_scope("call", Tool{"studio/write_file"}, "files:write");
requires_scope("call", Tool{"studio/publish"}, "svg:write");

# Token exchange: a coding agent may delegate to an illustrator of the same server.
may_delegate(from: Agent, to: Agent, server: McpServer) if
  has_role(from, "coder", server) and
  has_role(to, "illustrator", server);

# Which scopes survive a delegation: reads always; writes while no MDM reports the person's
# device out of compliance (conditional delegation).
delegated_scope(_user: User, _from: Agent, _to: Agent, _server: McpServer, "files:read");
delegated_scope(user: User, _from: Agent, _to: Agent, _server: McpServer, scope: String) if
  scope in ["svg:write", "files:write"] and
  not signal(user, "device_compliant", false, _source, _set_at);

test "a coding agent delegates to an illustrator, not to anyone else" {
  setup {
    has_role(Agent{"coder"}, "coder", McpServer{"studio"});
    has_role(Agent{"svgbot"}, "illustrator", McpServer{"studio"});
  }
  assert may_delegate(Agent{"coder"}, Agent{"svgbot"}, McpServer{"studio"});
  assert_not may_delegate(Agent{"coder"}, Agent{"stranger"}, McpServer{"studio"});
  assert_not may_delegate(Agent{"svgbot"}, Agent{"coder"}, McpServer{"studio"});
  assert_not may_delegate(Agent{"coder"}, Agent{"svgbot"}, McpServer{"elsewhere"});
}

test "writes survive a delegation only while the device is compliant" {
  setup {
    signal(User{"sam"}, "device_compliant", false, "mdm", 1764620000);
  }
  assert delegated_scope(User{"sam"}, Agent{"coder"}, Agent{"svgbot"}, McpServer{"studio"}, "files:read");
  assert_not delegated_scope(User{"sam"}, Agent{"coder"}, Agent{"svgbot"}, McpServer{"studio"}, "svg:write");
  assert delegated_scope(User{"avery"}, Agent{"coder"}, Agent{"svgbot"}, McpServer{"studio"}, "svg:write");
  assert_not delegated_scope(User{"avery"}, Agent{"coder"}, Agent{"svgbot"}, McpServer{"studio"}, "admin");
}

test "an illustrator calls tools in its own folder only" {
  setup {
    has_relation(Tool{"studio/write_svg"}, "server", McpServer{"studio"});
    has_role(Agent{"svgbot"}, "illustrator", McpServer{"studio"});
    may_use_folder(Agent{"svgbot"}, "icons");
  }
  assert allow(Agent{"svgbot"}, "call", Tool{"studio/write_svg"}) with context {"arguments": {"folder": "icons"}};
  assert_not allow(Agent{"svgbot"}, "call", Tool{"studio/write_svg"}) with context {"arguments": {"folder": "secrets"}};
  assert_not allow(Agent{"stranger"}, "call", Tool{"studio/write_svg"}) with context {"arguments": {"folder": "icons"}};
}
