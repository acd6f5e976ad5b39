"""Connect to the quickstart through bastion with the official MCP Python SDK, as a person would.

    python examples/quickstart/client.py sam      # the support agent
    python examples/quickstart/client.py avery    # the admin
    python examples/quickstart/client.py sam http://127.0.0.1:8001/mcp/desk   # bastion elsewhere

The SDK finds bastion's authorization server from the 401 challenge, registers itself, and opens
the login page in your browser (or prints its address). Log in with the user's name and the
password ``quickstart-password``, allow, then paste the address your browser was sent to.

A call that waits for a person (docs/approvals.md) opens the approval page: answer there (as the
user it names: yourself for a confirmation, avery for sam's email out of hours or for a review),
then press Enter, and the call is decided again.

What ends the session (bastion refusing sam at connect once his role is gone, bastion not
running, an address where no MCP gateway answers, a sign-in denied, input ending at a prompt) is
said in one line, and the client exits with status 1; Ctrl-C ends it at once, at a prompt too, with status 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import webbrowser
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
from mcp import types
from mcp.client.auth import OAuthClientProvider, OAuthFlowError
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from mcp.shared.exceptions import MCPError

URL = "http://127.0.0.1:8000/mcp/desk"  # where `make run` serves the gateway
CHECK = f"check the address (`make run` serves the gateway at {URL})"
REDIRECT_URI = "http://127.0.0.1:33418/callback"  # nothing listens: you copy the address back


class Memory:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client

    async def set_client_info(self, info):
        self.client = info


async def open_browser(url: str) -> None:
    print(f"\nLog in at:\n  {url}\n")
    webbrowser.open(url)


async def pasted_callback() -> AuthorizationCodeResult:
    while True:
        url = await anyio.to_thread.run_sync(input, "Paste the address your browser was sent to: ")
        query = {k: v[0] for k, v in parse_qs(urlsplit(url.strip()).query).items()}
        if "error" in query:  # Deny on the consent page, say
            raise OAuthFlowError(f"{query['error']}: {query.get('error_description', '')}")
        if "code" in query:
            return AuthorizationCodeResult(
                code=query["code"], state=query.get("state"), iss=query.get("iss")
            )
        print("That address has no ?code=: paste the whole address your browser was sent to.")


async def open_approval_page(context, params) -> types.ElicitResult:
    """bastion asks the user to open a page (URL elicitation): the approval of a held call."""
    if params.mode != "url":
        return types.ElicitResult(action="decline")
    print(f"\n{params.message}\n  {params.url}\n")
    webbrowser.open(str(params.url))
    await anyio.to_thread.run_sync(input, "Press Enter once it is answered on that page: ")
    return types.ElicitResult(action="accept")


# What bastion answers while a call (or its result) waits for a person.
PENDING = (-32008, -32042)


def said(e: MCPError) -> str:
    """bastion's refusal, and the decision to look up (`bastion audit show <id>`)."""
    decision = (e.error.data or {}).get("decision_id")
    return f"{e.error.message} (decision {decision})" if decision else e.error.message


async def attempt(label: str, call) -> None:
    """Run ``call``; while it waits for a person, show where to answer and try again once."""
    for retry in (False, True):
        try:
            result = await call()
        except MCPError as e:
            data = e.error.data or {}
            if e.error.code not in PENDING:
                print(f"{label:<9} refused: {said(e)}")
            elif retry:
                print(f"{label:<9} still waits: {said(e)}")
            else:
                print(f"{label:<9} waits: {data.get('reason')}, answer at {data.get('url')}")
                await anyio.to_thread.run_sync(input, "Press Enter once it is answered: ")
                continue
            return
        content = result.contents if hasattr(result, "contents") else result.content
        print(f"{label:<9}", getattr(content[0], "text", content[0]))
        return


class NoGateway(Exception):
    """The address answered the MCP initialize, but not as an MCP gateway: a page not found, a
    web page, an error of its own."""


def answered(response: httpx2.Response | None, error: MCPError) -> str:
    """What the address answered the initialize with, as a person can check it."""
    if response is None:
        return error.error.message
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    if 200 <= response.status_code < 300 and kind:
        return f"HTTP {response.status_code} {kind}, not MCP"
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


async def main(user: str, url: str) -> None:
    auth = OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name=f"quickstart client ({user})",
            redirect_uris=[REDIRECT_URI],
            token_endpoint_auth_method="none",
            grant_types=["authorization_code", "refresh_token"],
            scope="customers:read customers:write",
        ),
        storage=Memory(),
        redirect_handler=open_browser,
        callback_handler=pasted_callback,
    )
    last: list[httpx2.Response] = []  # the last answer of the address, said if it is no gateway

    async def heard(response: httpx2.Response) -> None:
        last[:] = [response]

    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx2.AsyncClient(auth=auth, timeout=30, event_hooks={"response": [heard]})
        )
        try:
            client = await stack.enter_async_context(
                Client(
                    streamable_http_client(url, http_client=http),
                    elicitation_callback=open_approval_page,
                )
            )
        except Exception as error:
            refused = first(error, MCPError)
            if refused is None or "decision_id" in (refused.error.data or {}):
                raise  # not reached, a sign-in failed, or bastion's refusal: said as it is
            raise NoGateway(
                f"no MCP gateway at {url}: initialize was answered"
                f" {answered(last[0] if last else None, refused)}; {CHECK}"
            ) from error
        await session(client)


async def session(client: Client) -> None:
    """What the README's table shows: the lists, a search, an email, a deletion, the notes."""
    print("protocol", client.protocol_version)
    print("tools    ", [t.name for t in (await client.list_tools()).tools])
    print("resources", [str(r.uri) for r in (await client.list_resources()).resources])
    found = await client.call_tool("search_customers", {"query": ""})
    print("search   ", found.content[0].text)
    for name, arguments in [
        ("send_email", {"to": "ada@example.com", "subject": "Hello", "body": "Hi Ada"}),
        ("delete_customer", {"customer_id": "c-101"}),
    ]:
        await attempt(name, lambda n=name, a=arguments: client.call_tool(n, a))
    await attempt("notes", lambda: client.read_resource("customers://audit-notes"))


def first(error: BaseException, kind: type[BaseException]):
    """``error`` if it is a ``kind``, or the first ``kind`` in it (the SDK's task groups wrap
    what ends them); None if there is none."""
    if isinstance(error, BaseExceptionGroup):
        return next(filter(None, (first(e, kind) for e in error.exceptions)), None)
    return error if isinstance(error, kind) else None


def ending(error: BaseException, url: str) -> str | None:
    """The one line for what ends the session; None for anything else (its traceback shows)."""
    if isinstance(error, BaseExceptionGroup):  # the SDK's task groups wrap what ends them
        return next(filter(None, (ending(e, url) for e in error.exceptions)), None)
    if isinstance(error, NoGateway):
        return str(error)
    if isinstance(error, MCPError):
        return said(error)
    if isinstance(error, httpx2.TransportError):
        return f"cannot reach bastion at {url}: {error}; check that bastion runs there, and {CHECK}"
    if isinstance(error, OAuthFlowError):
        return f"sign-in failed: {error}"
    if isinstance(error, EOFError):  # `input` at a prompt
        return "input ended at a prompt (Ctrl-D, or nothing more piped in)"
    return None


def interrupted(signum, frame) -> None:
    """Ctrl-C ends the client at once, wherever it is. A prompt waits in a worker thread
    (``input``) that nothing can interrupt, and the SDK's task groups would turn the interrupt
    into a traceback: so say one line and leave, without unwinding (bastion ends the session when
    it idles)."""
    with contextlib.suppress(Exception):  # a print under way, a closed pipe: no traceback
        sys.stdout.flush()
    os.write(2, b"interrupted (Ctrl-C)\n")
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted)
    user = sys.argv[1] if len(sys.argv) > 1 else "sam"
    url = sys.argv[2] if len(sys.argv) > 2 else URL
    logging.getLogger("mcp.client").setLevel(logging.CRITICAL)  # said below, in one line
    try:
        anyio.run(main, user, url)
    except Exception as error:
        if (line := ending(error, url)) is None:
            raise
        sys.exit(line)
