"""Session label routes (scope ``labels``): forget a label set, or every set of a task
(docs/delegation.md, `bastion.delegation.labels`).

``POST /v1/labels/clear`` with ``{"user", "agent", "task"}`` forgets the label set of that user
and first agent (``task`` "" or left out: the set of calls bound to no task); with ``{"task"}``
alone it forgets every set of the task. Without Redis the sets live in each process, so this
clears those of the process that answers. Each clear is audited (``labels.cleared``: the user and
agent, the task, how many sets went, and the key as ``actor``), once it is done.
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.audit import AuditLog
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
    key = await require(request, SCOPE)
    body = await read_json(request)
    unknown = set(body) - {"user", "agent", "task"}
    if unknown:
        raise bad_request(f"unknown field(s) {sorted(unknown)}: expected user, agent, task")
    gateway = request.app.state.gateway
    if gateway is None:
        raise Problem(404, "No gateway", "this server has no [gateway]: it keeps no labels")
    store = gateway.enforcer.labels
    user = agent = None
    try:
        if "user" not in body and "agent" not in body:
            task = _id(body, "task", True)
            if not task:
                raise bad_request("give user and agent, or a task id")
            cleared = await store.wipe_task(task)
        else:
            user, agent, task = (
                _id(body, "user", True),
                _id(body, "agent", True),
                _id(body, "task", False),
            )
            if not user or not agent:
                raise bad_request("user and agent must not be empty")
            cleared = int(await store.clear(LabelKey(user, agent, task)))
    except LabelsUnavailable as e:
        raise Problem(503, "Labels unavailable", str(e)) from None
    # What the labels held back (mail after customer data) is allowed again: who lifted that,
    # and for whom, must be found later.
    audit = AuditLog(request.app.state.store.db)
    await anyio.to_thread.run_sync(
        lambda: audit.record(
            "labels.cleared",
            subject=user,
            client_id=agent,
            task=task,
            cleared=cleared,
            actor=f"key:{key.id}",
        )
    )
    return JSONResponse({"cleared": cleared})


routes = [Route("/v1/labels/clear", clear, methods=["POST"])]
