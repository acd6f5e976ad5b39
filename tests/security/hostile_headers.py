"""Hostile values of HTTP headers, as bytes on the wire, for the fuzz tests of tests/security:
`Authorization` and `Content-Type` values that break their grammar or carry bytes beyond
ASCII, and any bytes HTTP lets through in a header's value."""

from __future__ import annotations

import base64

from hypothesis import strategies as st


def basic(user: bytes, secret: bytes = b"s") -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + secret)


AUTHORIZATION = [
    b"Basic",
    b"Basic %zz",
    b"Basic =====",
    b"Basic " + base64.b64encode(b"no-colon"),
    basic(b"\xff", b"\xfe"),
    basic("é".encode(), "é".encode()),
    basic("é".encode("latin-1")),
    basic(b"a%ff", b"b%c3%28"),
    basic(b"%ed%a0%80"),
    basic(b""),
    b"Basic " + b"A" * 6000,
    b"Bearer \xff\xfe",
    "Bearer é".encode(),
    b"Bearer \xe9",
    b"Bearer a b",
    b"Bearer",
    b"Bearer " + b"x" * 7000,
    b"Bearer a.\xe9.c",
    b"Bearer e30.e30.e30",
    b"Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJcdWQ4MDAifQ.",
    b"Bearer eyJhbGciOiJFUzI1NiIsImtpZCI6Ilx1ZDgwMCJ9.e30.e30",
    b"DPoP \xe9",
    b"DPoP a.b.c",
    b"Negotiate x",
    b"\xe9",
]
CONTENT_TYPE = [
    b"application/x-www-form-urlencoded; charset=\xe9",
    b"application/x-www-form-urlencoded; charset=utf-7",
    b"application/x-www-form-urlencoded; charset=utf-16",
    b"application/x-www-form-urlencoded;;;",
    b'application/x-www-form-urlencoded; charset="',
    b"\xe9",
    b"multipart/form-data",
    b"multipart/form-data; boundary=\xe9",
    b"application/json",
    b"text/plain",
]
# `Content-Type` values near JSON's that are not it, or not as a reader expects it.
JSON_TYPES = [
    b"application/json; charset=utf-16",
    b"application/json; charset=\xe9",
    b"application/json;;",
    b"application/json, text/plain",
    b"application/jsonx",
    b"text/json",
    b"application/problem+json",
    b"APPLICATION/JSON",
    b"application/json; boundary=x",
    b"multipart/form-data; boundary=x",
]
# A header's value: one of the above, or bytes HTTP lets through (no CR, LF or NUL, nothing
# around it that HTTP strips).
HEADER_BYTES = st.binary(min_size=1, max_size=40).filter(
    lambda b: not set(b) & set(b"\r\n\x00") and b == b.strip(b" \t")
)
