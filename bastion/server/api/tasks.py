"""Task routes (scope ``tasks``): open a just-in-time task for an agent, list, show and end tasks
(docs/delegation.md, `bastion.delegation.tasks`).

A key with the scope sees and ends the tasks it opened; an ``admin`` key sees and ends every
task. Another key's task is answered 404, as an unknown one is. A task's facts are checked as
``/v1/facts`` checks facts, and may only grant the task's agent (``[tasks].predicates``, the
agent first): the scope is no way to write other facts.
"""

from __future__ import annotations

import contextlib

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.delegation.tasks import (
    MAX_ID_LENGTH,
    MAX_PURPOSE_LENGTH,
    MAX_REASON_LENGTH,
    STATUSES,
    Task,
    TaskClosed,
    TaskError,
    TaskForbidden,
    Tasks,
    TaskUnprocessable,
    UnknownTask,
)
from bastion.delegation.tasks import MAX_LIST as MAX_PAGE
from bastion.server.auth import require
from bastion.server.keys import ApiKey
from bastion.server.problems import Problem, bad_request, page_limit, read_json, unprocessable
from bastion.server.problems import field as get_field
from bastion.server.replica import ConsistencyTimeout, Replica

SCOPE = "tasks"
__all__ = ["MAX_ID_LENGTH", "MAX_PURPOSE_LENGTH", "MAX_REASON_LENGTH", "SCOPE", "routes"]


def _tasks(request: Request) -> Tasks:
    return request.app.state.tasks


def _owner(key: ApiKey) -> str | None:
    """Whose tasks the key sees: its own (None for an admin key: everyone's)."""
    return None if "admin" in key.scopes else f"key:{key.id}"


def _problem(e: TaskError) -> Problem:
    if isinstance(e, UnknownTask):
        return Problem(404, "Unknown task", str(e))
    if isinstance(e, TaskForbidden):
        return Problem(403, "Forbidden", str(e))
    if isinstance(e, TaskClosed):
        return Problem(409, "Task closed", str(e))
    if isinstance(e, TaskUnprocessable):
        return unprocessable(str(e))
    return bad_request(str(e))


async def _applied(request: Request) -> None:
    """Wait (bounded) until this replica reflects the facts written so far."""
    replica: Replica = request.app.state.replica
    seq = await anyio.to_thread.run_sync(request.app.state.store.head)
    with contextlib.suppress(ConsistencyTimeout):
        await replica.wait_for(seq, request.app.state.config.consistency_timeout)


async def _found(request: Request, key: ApiKey) -> Task:
    tasks = _tasks(request)
    task_id = request.path_params["task_id"]
    task = await anyio.to_thread.run_sync(lambda: tasks.get(task_id))
    owner = _owner(key)
    if task is None or (owner is not None and task.created_by != owner):
        raise Problem(
            404, "Unknown task", f"no task of yours has the id {task_id!r:.80} (GET /v1/tasks)"
        )
    return task


async def open_task(request: Request) -> JSONResponse:
    """Open a task: its facts are written with its expiry, together with it."""
    key = await require(request, SCOPE)
    body = await read_json(request)
    tasks = _tasks(request)
    user = get_field(body, "user", str)
    agent = get_field(body, "agent", str)
    purpose = get_field(body, "purpose", str)
    facts = get_field(body, "facts", list)
    expires_at = get_field(body, "expires_at", (int, float), required=False)
    expires_in = get_field(body, "expires_in", (int, float), required=False)
    if (expires_at is None) == (expires_in is None):
        raise bad_request(
            "give expires_in (seconds) or expires_at (epoch seconds): a task always ends"
        )
    if expires_in is not None:
        if expires_in <= 0:
            raise unprocessable("expires_in must be a positive number of seconds")
        expires_at = tasks.clock() + expires_in
    try:
        task = await anyio.to_thread.run_sync(
            lambda: tasks.open(user, agent, purpose, expires_at, facts, f"key:{key.id}")
        )
    except TaskError as e:
        raise _problem(e) from None
    await _applied(request)
    return JSONResponse({"task": task.to_json(tasks.clock())}, status_code=201)


async def list_tasks(request: Request) -> JSONResponse:
    """The newest tasks first: the key's own (every one for an admin key)."""
    key = await require(request, SCOPE)
    tasks = _tasks(request)
    params = request.query_params
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise bad_request(f"status must be one of {', '.join(STATUSES)}, got {status!r:.80}")
    limit = page_limit(request, MAX_PAGE)
    found = await anyio.to_thread.run_sync(
        lambda: tasks.list(created_by=_owner(key), status=status, limit=limit)
    )
    now = tasks.clock()
    return JSONResponse({"tasks": [t.to_json(now) for t in found]})


async def show_task(request: Request) -> JSONResponse:
    key = await require(request, SCOPE)
    task = await _found(request, key)
    return JSONResponse({"task": task.to_json(_tasks(request).clock())})


async def end_task(request: Request) -> JSONResponse:
    """End a task: its facts are deleted and its grants revoked at once. Ending an ended or
    expired task changes nothing more and answers ``ended: false``."""
    key = await require(request, SCOPE)
    body = await read_json(request) if await request.body() else {}
    reason = get_field(body, "reason", str, required=False) or "ended"
    task = await _found(request, key)
    tasks = _tasks(request)
    try:
        task, ended = await anyio.to_thread.run_sync(
            lambda: tasks.end(task.id, f"key:{key.id}", reason)
        )
    except TaskError as e:
        raise _problem(e) from None
    await _applied(request)
    return JSONResponse({"task": task.to_json(tasks.clock()), "ended": ended})


routes = [
    Route("/v1/tasks", open_task, methods=["POST"]),
    Route("/v1/tasks", list_tasks, methods=["GET"]),
    Route("/v1/tasks/{task_id}", show_task, methods=["GET"]),
    Route("/v1/tasks/{task_id}/end", end_task, methods=["POST"]),
]
