# Adaptive responses (docs/signals.md): a read-only downgrade while a device is out of
# compliance, and a fresh sign-in before a refund. The kill switch needs no rule: a suspension
# (`bastion agents suspend`) refuses every call whatever the policy says.
actor User {}
actor Agent {}
resource McpServer {}
resource Tool {}

declare noncompliant(User);
declare has_attribute(McpServer, String, String);

# Writes on production servers stop while the user's device is out of compliance; reads go on.
read_only(user: User, server: McpServer) if
  noncompliant(user) and has_attribute(server, "environment", "production");

# A refund needs the person to have signed in within the last five minutes (RFC 9470 step-up).
requires_recent_auth(_user: User, "call", Tool{"payments/refund"}, 300);

test "a non-compliant device downgrades production servers to read-only" {
  setup {
    noncompliant(User{"sam"});
    has_attribute(McpServer{"payments"}, "environment", "production");
    has_attribute(McpServer{"sandbox"}, "environment", "test");
  }
  assert read_only(User{"sam"}, McpServer{"payments"});
  assert_not read_only(User{"sam"}, McpServer{"sandbox"});
  assert_not read_only(User{"avery"}, McpServer{"payments"});
}

test "a refund asks for a recent sign-in, a search does not" {
  assert requires_recent_auth(User{"sam"}, "call", Tool{"payments/refund"}, 300);
  assert_not requires_recent_auth(User{"sam"}, "call", Tool{"payments/search"}, 300);
}
