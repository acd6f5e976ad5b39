"""Session label routes (scope ``labels``): forget a label set, or every set of a task
(docs/delegation.md, `bastion.delegation.labels`).

``POST /v1/labels/clear`` with ``{"user", "agent", "task"}`` forgets the label set of that user
and first agent (``task`` "" or left out: the set of calls bound to no task); with ``{"task"}``
alone it forgets every set of the task. Without Redis the sets live in each process, so this
clears those of the process that answers.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.delegation.labels import LabelKey, LabelsUnavailable
from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request, read_json
from bastion.server.problems import field as get_field

SCOPE = "labels"
MAX_ID_LENGTH = 1024
__all__ = ["MAX_ID_LENGTH", "SCOPE", "routes"]


def _id(body: dict, name: str, required: bool) -> str:
    value = get_field(body, name, str, required=required)
    if value is not None and len(value) > MAX_ID_LENGTH:
        raise bad_request(f"the field {name!r} is longer than {MAX_ID_LENGTH} characters")
    return value or ""


async def clear(request: Request) -> JSONResponse:
    """Forget one label set, or (``task`` alone) every label set of a task."""
    await require(request, SCOPE)
    body = await read_json(request)
    unknown = set(body) - {"user", "agent", "task"}
    if unknown:
        raise bad_request(f"unknown field(s) {sorted(unknown)}: expected user, agent, task")
    gateway = request.app.state.gateway
    if gateway is None:
        raise Problem(404, "No gateway", "this server has no [gateway]: it keeps no labels")
    store = gateway.enforcer.labels
    try:
        if "user" not in body and "agent" not in body:
            task = _id(body, "task", True)
            if not task:
                raise bad_request("give user and agent, or a task id")
            return JSONResponse({"cleared": await store.wipe_task(task)})
        key = LabelKey(_id(body, "user", True), _id(body, "agent", True), _id(body, "task", False))
        if not key.user or not key.agent:
            raise bad_request("user and agent must not be empty")
        return JSONResponse({"cleared": int(await store.clear(key))})
    except LabelsUnavailable as e:
        raise Problem(503, "Labels unavailable", str(e)) from None


routes = [Route("/v1/labels/clear", clear, methods=["POST"])]
