"""Agent identities: every OAuth client is an agent with an owner, a name, a purpose, a status and
optionally a parent agent (`bastion.agents.identity` for the facts, `bastion.agents.registry` for
the view the CLI and the /v1 API show)."""
