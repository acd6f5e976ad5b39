"""The path a request is routed by: its ASGI ``path`` below the application's root path, as
Starlette's router reads it; for the pieces that route ahead of the router (the gateway, CORS)."""

from __future__ import annotations

from starlette.types import Scope


def route_path(scope: Scope) -> str:
    """The request's path below the application's root path (as Starlette's router reads it)."""
    path, root = scope["path"], scope.get("root_path")
    return path[len(root) :] if root and path.startswith(root) else path
