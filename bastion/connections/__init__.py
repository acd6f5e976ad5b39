"""Per-user credentials toward upstream MCP servers: bastion as each user's OAuth client of an
upstream's authorization server (`bastion.connections.service` is the entry module)."""
