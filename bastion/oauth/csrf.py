"""CSRF tokens for bastion's own forms that no stored request carries a token for (the sign-in
page, the approval pages): HMAC-based tokens as the OWASP CSRF Prevention Cheat Sheet describes
them ("signed double-submit cookie"), bound to a cookie only the browser holds.

A token is ``<issued>.<HMAC-SHA256(secret, purpose, binding, issued)>``: ``purpose`` names the
form (and what it acts on, e.g. one approval request), ``binding`` is the value of a cookie of
the browser (its session, or the browser cookie before sign-in). Another site can make the
browser send the cookie but cannot read it, so it cannot make a token that matches; a token
copied from one form is refused by another, and every token is refused after ``max_age``.

A form is also refused when its request's ``Origin`` header (or, without one, its ``Referer``)
names another site than the issuer's (`foreign_origin`, the cheat sheet's "verifying origin with
standard headers"): every current browser sends ``Origin`` with a POST, so another site's page
cannot submit one of bastion's forms even with a token and cookies it managed to plant.

The browser cookie's value is bastion's own too (`FormTokens.browser_id`: random, with a MAC), so
a value someone else chose and planted in a browser (from a sibling subdomain, or over plain HTTP)
is never adopted as the browser's: it binds no form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from starlette.requests import Request

from bastion.constant_time import same
from bastion.origins import normalized_origin, origin_of

# The purpose under which browser cookie values are MACed: no form's token is made for it.
_BROWSER = "browser-cookie"


class FormTokens:
    """Makes and checks the tokens under one secret of the deployment (`read_secret`: at
    start in a server, at first use in a command)."""

    def __init__(self, secret: Callable[[], bytes], clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._key: bytes | None = None
        self.clock = clock

    def read_secret(self) -> bytes:
        """The secret, read (made, the first time) unless it was already: a file's I/O."""
        if self._key is None:
            self._key = self._secret()
        return self._key

    def _mac(self, purpose: str, binding: str, issued: str) -> str:
        message = "\x00".join(("bastion-form", purpose, binding, issued)).encode()
        return hmac.new(self.read_secret(), message, hashlib.sha256).hexdigest()

    def browser_id(self) -> str:
        """A new value for the browser cookie: random, and marked as bastion's by its MAC."""
        value = secrets.token_urlsafe(32)
        return f"{value}.{self._mac(_BROWSER, value, '')}"

    def made_here(self, browser_id: str) -> bool:
        """Whether ``browser_id`` is a value `browser_id` made (under this deployment's secret)."""
        value, dot, mac = browser_id.partition(".")
        if not (value and dot and mac and browser_id.isascii()):
            return False
        return same(mac, self._mac(_BROWSER, value, ""))

    def token(self, purpose: str, binding: str) -> str:
        issued = str(int(self.clock()))
        return f"{issued}.{self._mac(purpose, binding, issued)}"

    def valid(self, token: str, purpose: str, binding: str, max_age: float) -> bool:
        """Whether ``token`` was made for ``purpose`` and ``binding`` no more than ``max_age``
        seconds ago. An empty binding (no cookie) matches nothing."""
        issued, dot, mac = token.partition(".")
        if not (binding and dot and mac and token.isascii()):
            return False
        if not (issued.isdigit() and len(issued) <= 12):
            return False
        if not 0 <= self.clock() - int(issued) <= max_age:
            return False
        return same(mac, self._mac(purpose, binding, issued))


def foreign_origin(request: Request, issuer: str) -> str | None:
    """Where the request says it was sent from when that is not the issuer's origin; None when
    it is, or when the request says nothing. That is its ``Origin`` (``null``, a sandboxed or
    hidden origin, is not the issuer's either); without one, the origin of its ``Referer``
    (the cheat sheet's fallback: a browser that sends no ``Origin``, or whose extension strips
    it, still names the page, and bastion's pages send it to bastion, ``Referrer-Policy:
    same-origin``). A browser sends ``Origin`` with every POST, so a form one of bastion's own
    pages sent has the issuer's; a request with neither header (a script) is left to the form's
    CSRF token."""
    sent = request.headers.get("origin")
    if sent is None:
        referer = request.headers.get("referer")
        if referer is None:
            return None
        sent = origin_of(referer) or referer
    own = origin_of(issuer)
    return None if own is not None and normalized_origin(sent) == own else sent[:200]
