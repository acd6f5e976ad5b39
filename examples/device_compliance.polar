# Device compliance and fresh signals (docs/signals.md): adaptive access from live signals.
#
# An MDM reports each user's device through the signals API:
#   POST /v1/signals {"subject": {"type": "User", "id": "sam"}, "name": "device_compliant",
#                     "value": false, "source": "mdm", "ttl_seconds": 3600}
# which is stored as the fact signal(User{"sam"}, "device_compliant", false, "mdm", <set_at>).
# While a user's device is not compliant, their agents keep reading but may not write: every
# tool not annotated read-only is refused. Setting it compliant brings writes back at once, with
# no new token. Production servers go further: nothing runs on them without a compliance report
# from the MDM of the last hour (requires_signal: missing or older, refused as signal_stale).
# The request's posture (context.network, context.device, context.token) narrows it again.
# A device can be reported on its own (a CAEP device-compliance-change naming it, from a
# transmitter with devices = true, writes
# device_compliance(Device{"laptop-7"}, "not-compliant")): the device a call comes from
# (context.device.id, from a token claim or a trusted proxy's header) then loses writes, and
# its user's other devices keep them.

actor User {}
actor Agent {}

resource McpServer {
  roles = ["user"];
  permissions = ["connect"];
  "connect" if "user";
}

resource Tool {
  relations = { server: McpServer };
}

resource Device {}

# What a signal source says: value, the source that said it, when (epoch seconds).
declare signal(User, String, Boolean, String, Integer);
# What a CAEP device-compliance-change says of a device: "compliant" or "not-compliant".
declare device_compliance(Device, String);
# The gateway names the server in context.server.
declare production_server(String);

allow(actor, action, resource) if has_permission(actor, action, resource);
allow(user: User, "call", tool: Tool) if
  has_relation(tool, "server", server) and has_role(user, "user", server);
allow(_agent: Agent, "call", _tool: Tool);
allow(_agent: Agent, "connect", _server: McpServer);

# Downgrade to read-only: a device reported non-compliant by the MDM (and only the MDM: another
# source cannot lift or impose it) leaves its user the read-only tools.
deny(user: User, "call", _tool: Tool) if
  signal(user, "device_compliant", false, "mdm", _set_at) and
  not context.annotations.readOnlyHint = true;

# The same for the device the call comes from, reported on its own (bastion's extension:
# an entity whose id is a value of the request; a call that names no device is not refused).
deny(_user: User, "call", _tool: Tool) if
  device_compliance(Device{context.device.id}, "not-compliant") and
  not context.annotations.readOnlyHint = true;

# Production: a compliance report of the last hour is required, and writes come from the
# corporate network or the VPN only.
requires_signal(_user: User, "device_compliant", 3600) if production_server(context.server);
deny(_user: User, "call", _tool: Tool) if
  production_server(context.server) and
  not context.annotations.readOnlyHint = true and
  not context.network.zone in ["corp", "vpn"];

test "a non-compliant device keeps reads and loses writes; compliant again, writes come back" {
  setup {
    has_role(User{"sam"}, "user", McpServer{"desk"});
    has_relation(Tool{"desk/search"}, "server", McpServer{"desk"});
    has_relation(Tool{"desk/delete"}, "server", McpServer{"desk"});
    signal(User{"sam"}, "device_compliant", false, "mdm", 1800000000);
    signal(User{"avery"}, "device_compliant", true, "mdm", 1800000000);
    has_role(User{"avery"}, "user", McpServer{"desk"});
  }
  assert allow(User{"sam"}, "call", Tool{"desk/search"})
    with context {annotations: {readOnlyHint: true}};
  assert_not allow(User{"sam"}, "call", Tool{"desk/delete"})
    with context {annotations: {destructiveHint: true}};
  assert allow(User{"avery"}, "call", Tool{"desk/delete"})
    with context {annotations: {destructiveHint: true}};
}

test "only the MDM's word counts" {
  setup {
    has_role(User{"sam"}, "user", McpServer{"desk"});
    has_relation(Tool{"desk/delete"}, "server", McpServer{"desk"});
    signal(User{"sam"}, "device_compliant", false, "a-script", 1800000000);
  }
  assert allow(User{"sam"}, "call", Tool{"desk/delete"})
    with context {annotations: {destructiveHint: true}};
}

test "production writes come from the corporate network or the VPN" {
  setup {
    production_server("prod");
    has_role(User{"sam"}, "user", McpServer{"prod"});
    has_relation(Tool{"prod/deploy"}, "server", McpServer{"prod"});
    signal(User{"sam"}, "device_compliant", true, "mdm", 1800000000);
  }
  assert allow(User{"sam"}, "call", Tool{"prod/deploy"})
    with context {server: "prod", network: {zone: "corp"}, annotations: {}};
  assert_not allow(User{"sam"}, "call", Tool{"prod/deploy"})
    with context {server: "prod", network: {zone: "public"}, annotations: {}};
  assert requires_signal(User{"sam"}, "device_compliant", 3600) with context {server: "prod"};
  assert_not requires_signal(User{"sam"}, "device_compliant", 3600) with context {server: "desk"};
}

test "a device reported not compliant loses writes; its user's other device keeps them" {
  setup {
    has_role(User{"sam"}, "user", McpServer{"desk"});
    has_relation(Tool{"desk/search"}, "server", McpServer{"desk"});
    has_relation(Tool{"desk/delete"}, "server", McpServer{"desk"});
    device_compliance(Device{"laptop-7"}, "not-compliant");
    device_compliance(Device{"phone-2"}, "compliant");
  }
  assert_not allow(User{"sam"}, "call", Tool{"desk/delete"})
    with context {device: {id: "laptop-7"}, annotations: {destructiveHint: true}};
  assert allow(User{"sam"}, "call", Tool{"desk/search"})
    with context {device: {id: "laptop-7"}, annotations: {readOnlyHint: true}};
  assert allow(User{"sam"}, "call", Tool{"desk/delete"})
    with context {device: {id: "phone-2"}, annotations: {destructiveHint: true}};
  assert allow(User{"sam"}, "call", Tool{"desk/delete"})
    with context {device: {}, annotations: {destructiveHint: true}};
}
