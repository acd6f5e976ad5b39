"""The read-only downgrade: the ``read_only(actor, server)`` obligation of the decision contract.

While ``read_only(p, McpServer{"<server>"})`` holds for any principal ``p`` of the chain, only
tools whose MCP annotations say ``readOnlyHint: true`` (MCP 2025-11-25, ``ToolAnnotations``) may
be called on that server; reads (``resources/read``, ``prompts/get``) go on. A tool with no
annotation, or one the upstream did not list, counts as a write; so does any method the gateway
passes through as sent (``gateway.pass_methods``: a vendor method, ``tasks/cancel``...), whose
effect upstream bastion cannot know. The downgrade fails closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from bastion.decide.mcp import server_of
from bastion.facts.model import Entity

if TYPE_CHECKING:
    from bastion.decide import Session

PREDICATE = "read_only"
SHAPE = (PREDICATE, "bb")
REASON = "read_only"
# What the refusal tells the agent (its JSON-RPC error message), beyond the reason's name.
MEANING = (
    "read only: the caller is downgraded to read-only on this server, where only tools annotated"
    " readOnlyHint: true may be called, and a method bastion cannot tell is a read is refused"
)
# The context field the gateway sets (true) on a message it passes through as sent, without
# knowing what it does upstream (`refuses_write`).
PASSED_THROUGH = "passed_through"


def read_only_holds(
    s: Session,
    principals: Iterable[Entity],
    context: Mapping | None,
    resource: Entity | None = None,
) -> bool:
    """Whether the policy downgrades any principal to read-only on the request's server: the
    one ``resource`` is on (`server_of`: a tool, resource or prompt names its server), and
    ``context.server`` (set by the gateway; a decision API's caller writes it) where it names
    another or the target names none. Both are asked: a context that names no server, or
    another one, never drops the downgrade of the server the target is on."""
    named = context.get("server") if context else None
    servers = [named] if isinstance(named, str) else []
    on = server_of(resource) if resource is not None else None
    if on is not None and on != named:
        servers.append(on)
    principals = tuple(principals)
    return any(
        s.rows(PREDICATE, "bb", p, Entity("McpServer", server))
        for server in servers
        for p in principals
    )


def is_read_only_tool(annotations: Any) -> bool:
    """Only an explicit ``readOnlyHint: true`` makes a tool a read."""
    return isinstance(annotations, Mapping) and annotations.get("readOnlyHint") is True


def refuses_write(read_only: bool, action: str, resource: Entity, context: Mapping) -> bool:
    """Whether a downgraded request may write, refused with reason ``read_only``: a call of a
    tool not annotated read-only, or any message passed through as sent."""
    if not read_only:
        return False
    if context.get(PASSED_THROUGH) is True:
        return True
    if action != "call" or resource.type != "Tool":
        return False
    return not is_read_only_tool(context.get("annotations"))
