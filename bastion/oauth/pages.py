"""The pages a person sees during authorization: login, consent and errors.

Server-rendered HTML with every value escaped, no scripts, and headers that forbid framing
(clickjacking, RFC 9700 §4.16), caching and referrer leaks.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

from starlette.responses import HTMLResponse

SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem}"
    "label{display:block;margin:.75rem 0 .25rem}"
    "input{width:100%;padding:.4rem;box-sizing:border-box}"
    "button{margin:1rem .5rem 0 0;padding:.5rem 1rem}.error{color:#a00}code{overflow-wrap:anywhere}"
)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width'><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _hidden(request_id: str, csrf_token: str) -> str:
    return (
        f"<input type=hidden name=request_id value='{escape(request_id, quote=True)}'>"
        f"<input type=hidden name=csrf_token value='{escape(csrf_token, quote=True)}'>"
    )


def _client_line(client_name: str, redirect_host: str) -> str:
    return (
        f"<p><strong>{escape(client_name)}</strong> (sends you back to "
        f"<code>{escape(redirect_host)}</code>) asks to act for you.</p>"
    )


def login_page(
    *,
    action: str,
    request_id: str,
    csrf_token: str,
    client_name: str,
    redirect_host: str,
    error: str | None = None,
    status: int = 200,
    username: str = "",
) -> HTMLResponse:
    problem = f"<p class=error role=alert>{escape(error)}</p>" if error else ""
    # After a failed attempt the name stays filled in; only the password is asked again.
    name = f" value='{escape(username, quote=True)}'" if username else ""
    body = (
        f"{_client_line(client_name, redirect_host)}{problem}"
        f"<form method=post action='{escape(action, quote=True)}'>{_hidden(request_id, csrf_token)}"
        "<label for=username>Username</label>"
        f"<input id=username name=username autocomplete=username required autofocus{name}>"
        "<label for=password>Password</label>"
        "<input id=password name=password type=password autocomplete=current-password required>"
        "<button type=submit>Sign in</button></form>"
    )
    return _page("Sign in to bastion", body, status)


def consent_page(
    *,
    action: str,
    request_id: str,
    csrf_token: str,
    username: str,
    client_name: str,
    client_id: str,
    redirect_host: str,
    resource: str,
    scopes: Iterable[str],
) -> HTMLResponse:
    items = "".join(f"<li><code>{escape(s)}</code></li>" for s in scopes) or "<li>(no scopes)</li>"
    body = (
        f"<p>Signed in as <strong>{escape(username)}</strong>.</p>"
        f"{_client_line(client_name, redirect_host)}"
        f"<p>Client id: <code>{escape(client_id)}</code></p>"
        f"<p>It wants access to <code>{escape(resource)}</code> with:</p><ul>{items}</ul>"
        f"<form method=post action='{escape(action, quote=True)}'>{_hidden(request_id, csrf_token)}"
        "<button type=submit name=decision value=allow>Allow</button>"
        "<button type=submit name=decision value=deny>Deny</button></form>"
    )
    return _page("Allow access?", body)


def error_page(error: str, description: str, status: int = 400) -> HTMLResponse:
    body = (
        f"<p class=error role=alert><code>{escape(error)}</code>: {escape(description)}</p>"
        "<p>Return to the application and start again.</p>"
    )
    return _page("Authorization failed", body, status)
