"""The pages a person sees at bastion: login, consent, the answer to a backchannel (OpenID CIBA)
request and errors during authorization, and the sign-in of bastion's own pages (`page` is the
frame every page of bastion uses, approvals too).

Server-rendered HTML with every value escaped, no scripts, and headers that forbid framing
(clickjacking, RFC 9700 §4.16), caching and referrer leaks to other sites. A client's name is
only vouched for when an administrator registered it; otherwise the pages say plainly that it is
unverified, and for a metadata-document client, which host identifies it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from urllib.parse import urlsplit

from starlette.responses import HTMLResponse, RedirectResponse

from bastion.names import readable

SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    # No referrer to another site (the redirect URI, a link); to bastion itself the browser then
    # sends its real ``Origin`` with each form (under no-referrer it sends ``null``), which is
    # how a form from another site is told apart (`bastion.oauth.csrf.foreign_origin`).
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}

_STYLE = (
    # Text others chose (a binding message, a client's name) may be one long word: it wraps
    # inside the page, never runs off the side of a phone's screen where nobody reads it.
    "body{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem;"
    "overflow-wrap:anywhere}"
    "label{display:block;margin:.75rem 0 .25rem}"
    "input{width:100%;padding:.4rem;box-sizing:border-box}"
    "button{margin:1rem .5rem 0 0;padding:.5rem 1rem}.error{color:#a00}"
    ".unverified{border:2px solid #b45309;background:#fff7ed;padding:0 .75rem;margin:1rem 0}"
    ".host{font-family:monospace;font-size:1.15em}.verified{color:#166534}"
    "details{margin-top:1.5rem;color:#555}"
    # Pages that show data (approvals): wider, with tables and JSON blocks.
    "body.wide{max-width:52rem}pre{overflow:auto;background:#f4f4f5;padding:.75rem;"
    "white-space:pre-wrap;overflow-wrap:anywhere}table{border-collapse:collapse;width:100%}"
    "th,td{text-align:left;vertical-align:top;padding:.3rem .5rem;border-bottom:1px solid #ddd}"
    "fieldset{margin:1rem 0;border:1px solid #ccc}.note{color:#555}"
    "input[type=radio]{width:auto}input[type=number]{width:6rem;display:inline-block}"
    "label.inline{display:inline}"
    "form.sign-out button{margin:0 0 .5rem;padding:.2rem .6rem}"
)


def page(title: str, body: str, status: int = 200, *, wide: bool = False) -> HTMLResponse:
    """A whole page of bastion: ``body`` must be escaped HTML already; ``title`` is escaped
    here. Every page carries `SECURITY_HEADERS`."""
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width'><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body{' class=wide' if wide else ''}>"
        f"<h1>{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def redirect(location: str, status: int = 303) -> RedirectResponse:
    """A redirect from one of bastion's pages (to another, to sign in, to a client or a
    provider), with `SECURITY_HEADERS` as every page: never cached, never framed."""
    return RedirectResponse(location, status_code=status, headers=SECURITY_HEADERS)


def shown(name: str) -> str:
    """A name someone else chose (a client's, a user's or agent's id, a target), as HTML:
    `bastion.names.readable` (what does not show as itself escaped, a long name cut), then
    escaped as any text."""
    return escape(readable(name))


def _hidden(request_id: str, csrf_token: str) -> str:
    return (
        f"<input type=hidden name=request_id value='{escape(request_id, quote=True)}'>"
        f"<input type=hidden name=csrf_token value='{escape(csrf_token, quote=True)}'>"
    )


@dataclass(frozen=True)
class ClientShown:
    """What the pages say about the client asking: its name, whether anyone vouches for it, and
    where it sends the person back to."""

    name: str
    client_id: str
    source: str  # "admin", "dynamic" (RFC 7591) or "metadata_document"
    redirect_host: str

    @property
    def verified(self) -> bool:
        """Only an administrator's registration vouches for a name; anyone can register any
        name for themselves, or publish a metadata document that claims one."""
        return self.source == "admin"

    @property
    def document_host(self) -> str | None:
        """The host of the metadata document that identifies the client, if one does."""
        if self.source != "metadata_document":
            return None
        return urlsplit(self.client_id).hostname or self.client_id


def _client_block(client: ClientShown) -> str:
    name = shown(client.name)
    if client.verified:
        return (
            f"<p><strong>{name}</strong> <span class=verified>registered by your"
            " administrator</span> (sends you back to"
            f" <code>{escape(client.redirect_host)}</code>) asks to act for you.</p>"
        )
    if client.document_host is not None:
        host = escape(client.document_host)
        who = (
            f"<p><strong>Unverified application from <span class=host>{host}</span>.</strong>"
            f" It is identified only by a document published at <strong>{host}</strong>; the"
            f" name it gives, &ldquo;{name}&rdquo;, is whatever {host} wrote there.</p>"
        )
    else:
        who = (
            "<p><strong>Unverified application.</strong> It registered itself, and anyone can"
            f" register any name: &ldquo;{name}&rdquo; may not be what it says it is.</p>"
        )
    return (
        f"<div class=unverified role=note>{who}<p>Continue only if you started this from the"
        " application you expect.</p></div><p>It asks to act for you, and will send you back to"
        f" <code>{escape(client.redirect_host)}</code>.</p>"
    )


def _technical(client: ClientShown) -> str:
    return (
        "<details><summary>Technical details</summary>"
        f"<p>Client id: <code>{shown(client.client_id)}</code></p></details>"
    )


def _credentials(username: str) -> str:
    """The username and password fields of a sign-in form, and its button. After a failed
    attempt the name stays filled in; only the password is asked again."""
    name = f" value='{escape(username, quote=True)}'" if username else ""
    return (
        "<label for=username>Username</label>"
        f"<input id=username name=username autocomplete=username required autofocus{name}>"
        "<label for=password>Password</label>"
        "<input id=password name=password type=password autocomplete=current-password required>"
        "<button type=submit>Sign in</button>"
    )


def _providers(providers: Iterable[tuple[str, str]], hidden: str) -> str:
    """A button per identity provider: each a form that posts ``hidden`` to the provider's
    login (`bastion.identity.oidc_login`), which sends the browser on to the provider."""
    return "".join(
        f"<form method=post action='{escape(action, quote=True)}'>{hidden}"
        f"<button type=submit>Sign in with {escape(name)}</button></form>"
        for action, name in providers
    )


def login_page(
    *,
    action: str,
    request_id: str,
    csrf_token: str,
    client: ClientShown,
    error: str | None = None,
    status: int = 200,
    username: str = "",
    providers: Iterable[tuple[str, str]] = (),
    passwords: bool = True,
) -> HTMLResponse:
    """The login of an authorization request: a button per identity provider, then (unless
    turned off) the password form."""
    problem = f"<p class=error role=alert>{escape(error)}</p>" if error else ""
    hidden = _hidden(request_id, csrf_token)
    form = (
        f"<form method=post action='{escape(action, quote=True)}'>{hidden}"
        f"{_credentials(username)}</form>"
        if passwords
        else ""
    )
    body = f"{_client_block(client)}{problem}{_providers(providers, hidden)}{form}"
    return page("Sign in to bastion", body, status)


@dataclass(frozen=True)
class ScopeShown:
    """A scope asked for, and what it lets the client do (None: shown by its name alone)."""

    scope: str
    description: str | None = None


def _access(resource_name: str, resource_uri: str, scopes: Iterable[ScopeShown]) -> tuple[str, str]:
    """The resource asked for, and the list items of the scopes with what each lets do (HTML)."""
    items = (
        "".join(
            f"<li>{escape(s.description)} <code class=scope>{escape(s.scope)}</code></li>"
            if s.description
            else f"<li><code class=scope>{escape(s.scope)}</code></li>"
            for s in scopes
        )
        or "<li>(no scopes)</li>"
    )
    if resource_name:
        resource = f"<strong>{escape(resource_name)}</strong> (<code>{escape(resource_uri)}</code>)"
    else:
        resource = f"<code>{escape(resource_uri)}</code>"
    return resource, items


def consent_page(
    *,
    action: str,
    request_id: str,
    csrf_token: str,
    username: str,
    client: ClientShown,
    resource_name: str,
    resource_uri: str,
    scopes: Iterable[ScopeShown],
) -> HTMLResponse:
    resource, items = _access(resource_name, resource_uri, scopes)
    body = (
        f"<p>Signed in as <strong>{shown(username)}</strong>.</p>"
        f"{_client_block(client)}"
        f"<p>It wants access to {resource} to:</p><ul>{items}</ul>"
        f"<form method=post action='{escape(action, quote=True)}'>{_hidden(request_id, csrf_token)}"
        "<button type=submit name=decision value=allow>Allow</button>"
        "<button type=submit name=decision value=deny>Deny</button></form>"
        f"{_technical(client)}"
    )
    return page("Allow access?", body)


def backchannel_request_page(
    *,
    action: str,
    csrf_token: str,
    signed_in: str,
    client_name: str,
    client_verified: bool,
    binding_message: str | None,
    resource_name: str,
    resource_uri: str,
    scopes: Iterable[ScopeShown],
    expires_in_minutes: int,
) -> HTMLResponse:
    """An OpenID CIBA request waiting for the person's answer: who asks, for what, and the
    message that binds it to what the application shows on its side. ``signed_in`` is
    `signed_in_as`'s HTML."""
    name = shown(client_name)
    if client_verified:
        who = (
            f"<p><strong>{name}</strong> <span class=verified>registered by your"
            " administrator</span> asks to act for you.</p>"
        )
    else:
        who = (
            "<div class=unverified role=note><p><strong>Unverified application.</strong> Its"
            f" name, &ldquo;{name}&rdquo;, is whatever it registered for itself.</p></div>"
            "<p>It asks to act for you.</p>"
        )
    message = (
        "<p>It shows this message on its side; approve only if it is the one you see there:</p>"
        f"<blockquote class=binding><strong>{escape(readable(binding_message, None))}</strong>"
        "</blockquote>"
        if binding_message
        else "<p>It gave no message to compare with what it shows you.</p>"
    )
    resource, items = _access(resource_name, resource_uri, scopes)
    body = (
        f"{signed_in}{who}{message}"
        f"<p>It wants access to {resource} to:</p><ul>{items}</ul>"
        f"<p>This request expires in about {expires_in_minutes} minute(s).</p>"
        f"<form method=post action='{escape(action, quote=True)}'>"
        f"<input type=hidden name=csrf_token value='{escape(csrf_token, quote=True)}'>"
        "<button type=submit name=decision value=approve>Approve</button>"
        "<button type=submit name=decision value=deny>Deny</button></form>"
    )
    return page("Approve access?", body)


def signed_in_as(username: str, sign_out_action: str, csrf_token: str) -> str:
    """Who is signed in, with a button to sign out (a form: a link could be followed by any
    page, `bastion.oauth.sign_in.SignOutEndpoint`)."""
    return (
        f"<p>Signed in as <strong>{shown(username)}</strong>.</p>"
        f"<form method=post action='{escape(sign_out_action, quote=True)}' class=sign-out>"
        f"<input type=hidden name=csrf_token value='{escape(csrf_token, quote=True)}'>"
        "<button type=submit>Sign out</button></form>"
    )


def message_page(
    title: str, message: str, status: int = 200, link: tuple[str, str] | None = None
) -> HTMLResponse:
    """A page that only tells the person something, with an optional ``(href, text)`` link."""
    go_on = f"<p><a href='{escape(link[0], quote=True)}'>{escape(link[1])}</a></p>" if link else ""
    return page(title, f"<p role=status>{escape(message)}</p>{go_on}", status)


def error_page(error: str, description: str, status: int = 400) -> HTMLResponse:
    body = (
        f"<p class=error role=alert><code>{escape(error)}</code>: {escape(description)}</p>"
        "<p>Return to the application and start again.</p>"
    )
    return page("Authorization failed", body, status)


def unsent_error_page(error: str, description: str, redirect_uri: str) -> HTMLResponse:
    """An authorization error that would go back to a redirect URI nobody vouches for: shown
    here, with a link there that the person may follow (RFC 9700 §4.11.2). ``redirect_uri``
    carries the error already."""
    host = escape(urlsplit(redirect_uri).netloc)
    body = (
        f"<p class=error role=alert><code>{escape(error)}</code>: {escape(description)}</p>"
        "<p>The application that sent you here registered itself, so nobody vouches for where"
        f" it asked to be answered: <span class=host>{host}</span>. bastion does not send you"
        " there on its own.</p><p>If you started this from the application you expect, return"
        f" to it: <a href='{escape(redirect_uri, quote=True)}'>tell {host} about the"
        " error</a>. Otherwise close this page.</p>"
    )
    return page("Authorization failed", body, 400)


def sign_in_page(
    *,
    action: str,
    next_path: str,
    csrf_token: str,
    error: str | None = None,
    status: int = 200,
    username: str = "",
    providers: Iterable[tuple[str, str]] = (),
    passwords: bool = True,
) -> HTMLResponse:
    """The sign-in of bastion's own pages (no application asks): back to ``next_path`` after."""
    problem = f"<p class=error role=alert>{escape(error)}</p>" if error else ""
    hidden = (
        f"<input type=hidden name=next value='{escape(next_path, quote=True)}'>"
        f"<input type=hidden name=csrf_token value='{escape(csrf_token, quote=True)}'>"
    )
    form = (
        f"<form method=post action='{escape(action, quote=True)}'>{hidden}"
        f"{_credentials(username)}</form>"
        if passwords
        else ""
    )
    body = (
        f"<p>Sign in to continue to <code>{escape(next_path)}</code>.</p>{problem}"
        f"{_providers(providers, hidden)}{form}"
    )
    return page("Sign in to bastion", body, status)
