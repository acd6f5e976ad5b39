"""The MCP gateway: the enforcement point in front of upstream MCP servers (see docs/gateway.md)."""

from bastion.gateway.config import GatewayConfig, UpstreamConfig
from bastion.gateway.gateway import Gateway

__all__ = ["Gateway", "GatewayConfig", "UpstreamConfig"]
