"""The docs say what the server serves and what its configuration accepts, as users follow them
literally: every path of the OpenAPI document is named in docs/, every `METHOD /path` docs/ shows
for the APIs it describes is an operation the server has, and every key each table of
bastion.toml accepts is named in the guide that documents that table."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from bastion.approvals.settings import ApprovalSettings
from bastion.connections.settings import KNOWN as UPSTREAM_OAUTH_KEYS
from bastion.delegation.tasks import TaskSettings
from bastion.gateway.config import GatewayConfig, UpstreamConfig
from bastion.identity import providers, trusted_issuers
from bastion.oauth import jwt_bearer
from bastion.oauth import settings as oauth
from bastion.server.config import TABLES, ServerConfig
from bastion.server.openapi import openapi_document
from bastion.signals import posture
from bastion.signals.alerts import AlertSettings
from bastion.signals.behavior import BehaviorSettings
from bastion.signals.settings import TRANSMITTER_KEYS, SsfSettings
from bastion.signals.store import SignalSettings
from bastion.webhooks import WEBHOOK_KEYS

DOCS = Path(__file__).resolve().parents[2] / "docs"
METHODS = ("get", "post", "put", "patch", "delete")


def _guides() -> dict[str, str]:
    # benchmarks.md records runs: it names no interface a user is meant to follow.
    return {p.name: p.read_text() for p in sorted(DOCS.glob("*.md")) if p.name != "benchmarks.md"}


def _template(path: str) -> re.Pattern[str]:
    """A path with its parameters (`{id}`, `<id>`, `{id:path}`) each matching one segment."""
    parts = re.split(r"\{[^}]*\}|<[^>]*>", path)
    return re.compile("[^/]+".join(re.escape(part) for part in parts))


def _same_path(written: str, served: str) -> bool:
    """Whether a path as the docs write it names a path the server describes, either side's
    parameters standing for any one segment (`/api/agents/event/<kind>` names each kind)."""
    concrete = re.sub(r"\{[^}]*\}|<[^>]*>", "x", written)
    return bool(_template(served).fullmatch(concrete) or _template(written).fullmatch(served))


def _described() -> list[tuple[str, str]]:
    """(method, path) of every operation of the OpenAPI document the server serves."""
    return [
        (method.upper(), path)
        for path, operations in openapi_document()["paths"].items()
        for method in operations
        if method in METHODS
    ]


# A path of the APIs the OpenAPI document describes, as prose and examples write it.
_PATH = re.compile(
    r"/(?:(?:v1|api|access|\.well-known)/[A-Za-z0-9_/{}<>.:-]*[A-Za-z0-9_}>]|healthz|readyz|metrics)"
)
_OPERATION = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE) `?(/(?:v1|api|access)/[^\s`?()\[\],;]*)")


def test_every_operation_the_server_describes_is_named_in_the_docs():
    written = {m.group(0) for text in _guides().values() for m in _PATH.finditer(text)}
    missing = sorted(
        {path for _, path in _described() if not any(_same_path(name, path) for name in written)}
    )
    assert not missing, f"paths of /v1/openapi.json no guide in docs/ names: {missing}"


def test_every_operation_the_docs_show_is_one_the_server_has():
    described = _described()
    wrong = sorted(
        {
            (name, method, path.rstrip("."))
            for name, text in _guides().items()
            for method, path in _OPERATION.findall(text)
            if not any(method == m and _same_path(path.rstrip("."), p) for m, p in described)
        }
    )
    assert not wrong, f"operations the docs show that the server does not serve: {wrong}"


# A path of bastion's own /v1 API (not another server's, as `<issuer>/v1/introspect` is Okta's).
_V1_PATH = re.compile(r"(?<![\w>])/v1/[A-Za-z0-9_/{}<>.:-]*[A-Za-z0-9_}>]")


def test_every_v1_path_the_docs_name_is_one_the_server_has():
    served = [path for _, path in _described()]
    wrong = sorted(
        {
            (name, path)
            for name, text in _guides().items()
            for path in _V1_PATH.findall(text)
            if not any(_same_path(path, p) for p in served)
        }
    )
    assert not wrong, f"/v1 paths the docs name that the server does not serve: {wrong}"


def _names(kind: type) -> set[str]:
    return {f.name for f in fields(kind)}


# Each table of bastion.toml: the keys its reader accepts, and the guide that documents them.
TABLE_KEYS = {
    "server": (_names(ServerConfig) - {*TABLES, "file"}, "operations.md"),
    "oauth": (_names(oauth.OAuthSettings), "oauth.md"),
    "oauth.resources": (_names(oauth.ProtectedResource), "oauth.md"),
    "oauth.client_metadata": (_names(oauth.ClientMetadataDocumentSettings), "oauth.md"),
    "oauth.login": (_names(oauth.LoginSettings), "oauth.md"),
    "oauth.open_registration": (_names(oauth.OpenRegistrationSettings), "oauth.md"),
    "oauth.refusal_audit": (_names(oauth.RefusalAuditSettings), "oauth.md"),
    "oauth.ciba": (_names(oauth.BackchannelSettings), "oauth.md"),
    "oauth.client_assertion": (_names(oauth.ClientAssertionSettings), "oauth.md"),
    "oauth.dpop": (_names(oauth.DPoPSettings), "identity.md"),
    "oauth.id_jag": (_names(jwt_bearer.IdJagSettings), "identity.md"),
    "oauth.id_jag.issuers": (jwt_bearer._ISSUER_KEYS, "identity.md"),
    "gateway": (_names(GatewayConfig), "gateway.md"),
    "gateway.upstreams": (_names(UpstreamConfig), "gateway.md"),
    "gateway.upstreams.oauth": (UPSTREAM_OAUTH_KEYS, "identity.md"),
    "gateway.trusted_issuers": (trusted_issuers._KEYS, "identity.md"),
    "identity": (providers._IDENTITY_KEYS, "identity.md"),
    "identity.providers": (providers._PROVIDER_KEYS, "identity.md"),
    "identity.providers.facts": (providers._FACT_MAPPING_KEYS, "identity.md"),
    "approvals": (_names(ApprovalSettings), "approvals.md"),
    "approvals.webhooks": (WEBHOOK_KEYS, "approvals.md"),
    "signals.ssf": (_names(SsfSettings), "signals.md"),
    "signals.ssf.transmitters": (TRANSMITTER_KEYS, "signals.md"),
    "signals.api": (_names(SignalSettings), "signals.md"),
    "signals.posture": (set(posture._KEYS), "signals.md"),
    "signals.behavior": (_names(BehaviorSettings), "signals.md"),
    "signals.alerts": (_names(AlertSettings), "signals.md"),
    "signals.alerts.webhooks": (WEBHOOK_KEYS, "signals.md"),
    "tasks": (_names(TaskSettings), "delegation.md"),
}


def _documents(text: str, table: str, key: str) -> bool:
    """Whether ``text`` names ``key``: in code (`key`, `table.key`), on a line of a TOML example
    (commented or not, `key = ...`, `# or key = ...`), in an inline table (`{ key = ... }`), or
    as the header of the sub-table it is or of one in it (`[table.key]`, `[[table.key.x]]`)."""
    k = re.escape(key)
    return bool(
        re.search(rf"`(?:[\w.\[\]]+\.)?{k}`", text)
        or re.search(rf"^\s*#?\s*{k}\s*=", text, re.M)
        or re.search(rf"[{{,#]\s*(?:or\s+)?{k}\s*=", text)
        or re.search(rf"\[\[?{re.escape(table)}\.{k}[.\]]", text)
    )


@pytest.mark.parametrize("table", sorted(TABLE_KEYS))
def test_every_key_a_table_accepts_is_named_in_its_guide(table):
    keys, guide = TABLE_KEYS[table]
    text = _guides()[guide]
    missing = sorted(key for key in keys if not _documents(text, table, key))
    assert not missing, f"[{table}] accepts keys docs/{guide} does not name: {missing}"
