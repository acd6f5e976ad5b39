"""The docs say what the server serves and what its configuration accepts, as users follow them
literally: every path of the OpenAPI document is named in docs/, every `METHOD /path` docs/ shows
for the APIs it describes is an operation the server has, and every key each table of
bastion.toml accepts is named in the guide that documents that table; and docs/security.md's
Limits table agrees with the code: each fixed bound it names exists at the value it gives, each
setting it names is a key its table accepts, and each bound the code defines (MAX_*, *_SECONDS...)
is named in docs/ or listed, with why, as no limit a deployment meets."""

from __future__ import annotations

import importlib
import re
from dataclasses import fields
from pathlib import Path

import pytest

import bastion
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


# -- docs/security.md's Limits table against the code ------------------------------------------


def _limit_rows() -> list[tuple[str, str, str]]:
    """(limit, default, setting) of each row of docs/security.md's Limits table."""
    text = (DOCS / "security.md").read_text()
    section = text.split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith(("| limit |", "|---")):
            continue
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        assert len(cells) == 3, f"a row of the Limits table of other than 3 cells: {line}"
        rows.append((cells[0], cells[1], cells[2]))
    assert len(rows) > 200, f"only {len(rows)} rows read from the Limits table"
    return rows


def _modules() -> dict[str, object]:
    """Every module of bastion/, by its dotted name."""
    root = Path(bastion.__file__).parent
    found = {}
    for file in sorted(root.rglob("*.py")):
        name = ".".join(("bastion", *file.relative_to(root).with_suffix("").parts))
        name = name.removesuffix(".__init__")
        found[name] = importlib.import_module(name)
    return found


def _resolve(reference: str, modules: dict[str, object], previous: object) -> tuple[object, object]:
    """(owner, value) of what ``reference`` names, (None, None) if nothing: `module.NAME` with
    the module's name written from any of its dotted parts on (`registration.MAX_REDIRECT_URIS`,
    `server.api.facts.MAX_PAGE`), a module (`jwt_bearer`), `Class.NAME` of some module, or a
    bare `NAME` of ``previous`` (the owner of the name the cell gave before it:
    `client_assertion.MAX_ASSERTION_CHARS`, `MAX_JTI_CHARS`)."""
    parts = reference.split(".")
    for cut in range(len(parts), 0, -1):
        module_part = ".".join(parts[:cut])
        for name, module in modules.items():
            if name not in (module_part, f"bastion.{module_part}") and not name.endswith(
                f".{module_part}"
            ):
                continue
            owner, found = None, module
            for part in parts[cut:]:
                owner, found = found, getattr(found, part, _resolve)
            if found is not _resolve:
                return (owner or module), found
    if previous is not None and len(parts) == 1 and hasattr(previous, reference):
        return previous, getattr(previous, reference)
    for module in modules.values():
        kind = getattr(module, parts[0], None)
        if isinstance(kind, type) and kind.__module__ == module.__name__:
            owner, found = module, kind
            for part in parts[1:]:
                owner, found = found, getattr(found, part, _resolve)
            if found is not _resolve:
                return owner, found
    return None, None


_UNITS = {"KiB": 1024, "MiB": 1 << 20, "Mi": 1 << 20, "years": 365 * 86400}
_NUMBER = re.compile(r"(\d[\d,]*(?:\.\d+)?)(?:\s*(KiB|MiB|Mi|years)\b)?")


def _numbers(text: str) -> set[float]:
    """The numbers ``text`` writes (`2,600`, `64 KiB`, `10 years`, `2^63`), in plain units."""
    found = set()
    for number, unit in _NUMBER.findall(text):
        value = float(number.replace(",", ""))
        found |= {value, value * _UNITS.get(unit, 1)}
    for power in re.findall(r"2\^(\d+)", text):
        found |= {2.0 ** int(power), 2.0 ** int(power) - 1, -(2.0 ** int(power))}
    return found


def test_every_fixed_bound_the_limits_table_names_is_in_the_code_at_the_value_it_gives():
    modules = _modules()
    wrong = []
    checked = 0
    for limit, default, setting in _limit_rows():
        # The names in "fixed (...)" / "fixed bound ..." / "the bound fixed (...)" / "... fixed: ..."
        fixed = re.search(r"fixed\b(.*)", setting)
        if fixed is None:
            continue
        previous = None
        for reference in re.findall(r"`([A-Za-z_][\w.]*)`(?!'s)", fixed.group(1)):
            if (
                reference.islower()
                and "." not in reference
                and reference not in (name.rsplit(".", 1)[-1] for name in modules)
            ):
                continue  # a setting named beside the bound (`max_json_depth`)
            owner, found = _resolve(reference, modules, previous)
            if owner is None:
                wrong.append(f"{limit[:60]!r}: `{reference}` names nothing in bastion/")
                continue
            checked += 1
            previous = owner
            constant = reference.rsplit(".", 1)[-1].lstrip("_")
            if (
                constant.isupper()
                and isinstance(found, int | float)
                and not isinstance(found, bool)
                and float(found) not in _numbers(f"{limit} {default}")
            ):
                wrong.append(
                    f"{limit[:60]!r}: the table says {default!r}, `{reference}` is {found}"
                )
    assert checked > 80, f"only {checked} bounds checked: is the table read?"
    assert not wrong, "the Limits table and the code disagree:\n" + "\n".join(wrong)


# A setting the table names, as it writes it: `[table] key`, `[table].key`, `gateway.key`.
_SETTING = re.compile(r"`\[\[?([\w.]+)\]\]?\.?\s*([\w.]+)`|`(gateway|server)\.(\w+)`")
# `key` of each `[[table]]`, `key` of an upstream's `oauth` table.
_KEY_OF = re.compile(r"`(\w+)` of (?:each `\[\[([\w.]+)\]\]`|an upstream's `oauth` table)")


def test_every_setting_the_limits_table_names_is_one_its_table_accepts():
    wrong = []
    named = 0
    for limit, _, setting in _limit_rows():
        settings = []
        table = None
        for match in re.finditer(rf"{_SETTING.pattern}|`([a-z]\w*)`(?!\s+of\b)", setting):
            if match.group(1) or match.group(3):
                table = match.group(1) or match.group(3)
                key = match.group(2) or match.group(4)
                if "." in key:  # `[[gateway.upstreams]] oauth.allow_private_addresses`
                    sub, key = key.rsplit(".", 1)
                    table = f"{table}.{sub}"
                settings.append((table, key))
            elif table is not None and match.group(5):  # `[oauth.login] a`, `b`: both of it
                settings.append((table, match.group(5)))
        for key, owner in _KEY_OF.findall(setting):
            settings.append((owner or "gateway.upstreams.oauth", key))
        for variable in re.findall(r"`BASTION_(\w+)`", setting):
            settings.append(("server", variable.lower()))
        for table, key in settings:
            named += 1
            keys = TABLE_KEYS.get(table, (set(),))[0]
            if key not in keys and key not in ("true", "false"):  # a value shown: `true`
                wrong.append(f"{limit[:60]!r}: [{table}] has no key {key!r}")
    assert named > 150, f"only {named} settings read from the Limits table"
    assert not wrong, "settings the Limits table names:\n" + "\n".join(wrong)


# Bounds in the code that are not limits a deployment meets, each with why the Limits table
# leaves it out. Any other module constant named as a bound (MAX_*, MIN_*, *_SECONDS, *_BYTES,
# *_CHARS, *_LENGTH, *_LIMIT) is named in docs/ (in code: `module.NAME`, `NAME`).
_NOT_LIMITS = {
    "bastion.audit.buffered.FLUSH_SECONDS": "how often buffered records are written (200 ms)",
    "bastion.connections.service._REFRESH_POLL_SECONDS": "how often a waiting refresh looks",
    "bastion.gateway.enforce.GIVE_BACK_WAIT_SECONDS": "a rate-limit refund's wait for Redis",
    "bastion.gateway.holds.POLL_SECONDS": "how often a held request looks for its answer",
    "bastion.gateway.holds.PROGRESS_SECONDS": "how often a held request tells it is waiting",
    "bastion.gateway.holds.LOOK_SECONDS": "how often a held request reads the database",
    "bastion.gateway.gateway.REQUEST_CHECK_SECONDS": "how often, on SQLite, the requests"
    " under way are looked at for another process's revocation",
    "bastion.signals.ssf.SHOWN_SECONDS": "how often /readyz's streams are read again",
    "bastion.gateway.http1._IDLE_SECONDS": "an idle pooled upstream connection is closed",
    "bastion.gateway.http1._DRAIN_SECONDS": "an unread answer drained to keep its connection",
    "bastion.gateway.upstream._GROUP_LOOK_SECONDS": "how often a stopping process group is looked at",
    "bastion.oauth.keys._SECRET_BYTES": "the size of a key bastion makes, not a bound",
    "bastion.facts.store._SNAPSHOT_KEY_BYTES": "the size of the fact snapshots' key, not a bound",
    "bastion.policy.compile._MAX_DEPTH": "how generated code is split (not the policy's text)",
    "bastion.policy.lexer._MAX_DIGITS": "a 64-bit integer's digits: the bound is its range",
    "bastion.redis_state.REMARK_SECONDS": "how long Redis keeps bastion's run mark",
    "bastion.server.config.MAX_PORT": "the largest TCP port",
    "bastion.server.problems.DEFAULT_LIMIT": "the page size when none is asked (each listing's row gives it)",
    "bastion.webhooks.LEASE_MARGIN_SECONDS": "a delivery's lease beyond its timeout",
}
_BOUND = re.compile(r"_?(?:MAX|MIN)_\w+|_?\w+_(?:SECONDS|BYTES|CHARS|LENGTH|LIMIT)")


def test_every_bound_in_the_code_is_in_the_docs():
    docs = "\n".join(_guides().values())
    missing = []
    for name, module in _modules().items():
        source = Path(module.__file__).read_text()
        for constant, value in vars(module).items():
            if not _BOUND.fullmatch(constant) or isinstance(value, bool):
                continue
            if not isinstance(value, int | float):
                continue
            if not re.search(rf"^{constant}\s*(?::[^=]*)?=", source, re.M):
                continue  # imported, not defined here
            if f"{name}.{constant}" in _NOT_LIMITS:
                continue
            if not re.search(rf"`[\w.]*\b{constant}`", docs):
                missing.append(f"{name}.{constant} = {value}")
    assert not missing, (
        "bounds no guide names (a row in docs/security.md's Limits table, or _NOT_LIMITS with"
        " why not):\n" + "\n".join(missing)
    )
