"""One Starlette route per path, whatever the number of methods on it.

Starlette answers a method a path does not take with 405 and an ``Allow`` header naming the
methods of the first route that matched the path; with one route per method, a path's other
methods are left out of ``Allow`` (RFC 9110 §15.5.6 wants them all).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

Endpoint = Callable[[Request], Awaitable[Response]]


def one_route_per_path(routes: list[BaseRoute]) -> list[BaseRoute]:
    """``routes`` with the plain routes of one path joined into a route that takes every method
    of them, in the order of each path's first route; other routes are kept as they are."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    out: list[BaseRoute | str] = []
    for route in routes:
        if not (isinstance(route, Route) and route.methods):
            out.append(route)
            continue
        if route.path not in by_path:
            by_path[route.path] = {}
            out.append(route.path)
        for method in route.methods - {"HEAD"}:
            by_path[route.path][method] = route.endpoint
    return [_joined(item, by_path[item]) if isinstance(item, str) else item for item in out]


def _joined(path: str, endpoints: dict[str, Endpoint]) -> Route:
    if len(endpoints) == 1:
        ((method, endpoint),) = endpoints.items()
        return Route(path, endpoint, methods=[method])

    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await endpoints[method](request)

    return Route(path, dispatch, methods=sorted(endpoints))
