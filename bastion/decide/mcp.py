"""The MCP mapping (docs/gateway.md): the action each MCP message is decided as, by the entity it
is decided on. The gateway asks its questions with it, and `bastion audit replay` reads back,
with it, the question a decision record asked."""

from __future__ import annotations

from bastion.facts.model import Entity

# A message on each entity: connect to the server, call a tool, read a resource, get a prompt.
MESSAGE_ACTIONS = {"McpServer": "connect", "Tool": "call", "McpResource": "read", "Prompt": "get"}
# The client's requests decided as that action on each entity (`message_action`), as people read
# them: what a grant of that action on that entity (an approval for minutes) lets through.
DECIDED_AS = {
    "McpServer": "every request to the server",
    "Tool": "tools/call",
    "McpResource": (
        "resources/read, resources/subscribe, and completion/complete of its template's arguments"
    ),
    "Prompt": "prompts/get, and completion/complete of its arguments",
}
# The requests an upstream may send a client, and the capability the client must have declared.
# Each is decided as the action its method names, on the upstream's ``McpServer``.
CLIENT_REQUESTS = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}


def message_action(resource: Entity) -> str:
    """The action a client's message on ``resource`` is decided as (`MESSAGE_ACTIONS`)."""
    return MESSAGE_ACTIONS[resource.type]


def server_of(resource: Entity) -> str | None:
    """The server an entity of the MCP mapping is on: an ``McpServer``'s id, or the name before
    the first ``/`` of a ``Tool``'s, ``McpResource``'s or ``Prompt``'s id (a server's name holds
    no ``/``); None for any other entity, or one whose id names no server."""
    if resource.__class__ is not Entity or resource.type not in MESSAGE_ACTIONS:
        return None
    if resource.type == "McpServer":
        return resource.id
    server, slash, _ = resource.id.partition("/")
    return server if slash and server else None


def recorded_action(method: str, resource: Entity, action: str = "") -> str | None:
    """The action a decision record's question asked: the one it names (``action``); for a
    record written before records named it, the one `message_action` gives, where nothing else
    could have been asked. None where something else could: an upstream's request to a client
    (`CLIENT_REQUESTS`) is decided on its server as its method, just after the ``connect`` it
    reaches that client under, and both records name the same method and target."""
    if action:
        return action
    if resource.type not in MESSAGE_ACTIONS:
        return None
    if resource.type == "McpServer" and method in CLIENT_REQUESTS:
        return None
    return message_action(resource)
