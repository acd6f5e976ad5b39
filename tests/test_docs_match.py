"""What README.md and docs/ tell a person to type works as written: every `bastion ...` command,
in a code block or inline, names a command, sub-command, options and choices the real parser has
(built from bastion/cli.py, never run), and that parser takes it (a synopsis in each of its
forms, a placeholder standing for a value; inline code that only names a command or its options
is not parsed); README.md runs bastion and python from the .venv/ that make creates; every TOML
example is read by the readers `bastion serve` hands each table to; every `make <target>` is a
rule of the Makefile. (tests/server/test_docs.py checks the other direction: what the server
has is named in the docs.)"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from bastion.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its language tag, its lines."""

    file: str
    line: int  # of its first line of content, 1-based
    language: str
    text: str


_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


def _blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, language = fence.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        ]
        yield Block(str(path.relative_to(ROOT)), i + 2, language, "\n".join(body))
        i = end + 1


# -- bastion commands --------------------------------------------------------------------------

# Code blocks a person types (or reads commands from); polar, python, json, toml and http hold
# none, and a `bastion` in them is something else.
_SHELL_LANGUAGES = {"", "sh", "shell", "bash", "console", "text"}
# `bastion` run as a command: first on its line (after a `$ ` prompt or variable assignments),
# or after a pipe, `;`, `&&` or `$(`; by its name or a path (.venv/bin/bastion).
_INVOCATION = re.compile(
    r"(?:^\s*(?:\$\s+)?(?:\w+=\S*\s+)*|[|;&]\s*|\$\()(?P<program>(?:[\w./$()-]*/)?bastion)\s+(?=[a-z-])"
)
# Where the command ends: a pipe, a list operator, a redirection, a background `&` (a `|` inside
# a synopsis's [ ] separates alternatives: `[--parent ID | --no-parent]`).
_END = re.compile(r"\s(?:\||&&?|;|[12]?>|<<)(?:\s|$)|\)\s*$")


def _end(text: str) -> int:
    """Where the command that ``text`` begins with ends."""
    for end in _END.finditer(text):
        if text.count("[", 0, end.start()) <= text.count("]", 0, end.start()):
            return end.start()
    return len(text)


# A comment, to the end of its line.
_COMMENT = re.compile(r"(?:^|\s)#.*$")
# Inline code that names bastion's own words, not a command: its messages quoted in the docs
# ("bastion refused this request (...)", the JSON-RPC "bastion error -32003").
_MESSAGES = {"refused", "error"}


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    text: str  # from `bastion` on
    program: str  # as typed: bastion, .venv/bin/bastion ("" inline: named, not typed)


def _commands() -> Iterator[Command]:
    """Each `bastion ...` the docs show: run in a code block, or named in inline code."""
    for path in _documents():
        for block in _blocks(path):
            if block.language not in _SHELL_LANGUAGES:
                continue
            lines = block.text.split("\n")
            n = 0
            while n < len(lines):
                start, line = n, lines[n]
                while line.rstrip().endswith("\\") and n + 1 < len(lines):
                    n += 1
                    line = line.rstrip()[:-1] + " " + lines[n].strip()
                n += 1
                line = _COMMENT.sub("", line)
                for found in _INVOCATION.finditer(line):
                    text = line[found.end() :]
                    text = "bastion " + text[: _end(text)].strip()
                    yield Command(
                        block.file,
                        block.line + start,
                        text,
                        found.group("program"),
                    )
        for number, span in _inline_code(path):
            span = re.sub(r"^\.venv/bin/", "", span)
            if not span.startswith("bastion ") or not re.match(r"[a-z]", span[8:]):
                continue
            if span.split()[1] in _MESSAGES:
                continue
            yield Command(str(path.relative_to(ROOT)), number, span, "")


def _inline_code(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of each inline code span: in the prose, its line breaks (a span may run
    over two lines of a paragraph) as spaces; in a fenced block, within one line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for block in _blocks(path):  # (blanked: a fence's backticks would pair with the prose's)
        for n in range(block.line - 2, block.line + block.text.count("\n") + 1):
            for span in re.findall(r"`([^`]+)`", lines[n]):
                yield n + 1, span
            lines[n] = ""
    text = "\n".join(lines)
    for span in re.finditer(r"(?<!`)`(?!`)((?:[^`\n]|\n(?!\s*\n))+)`(?!`)", text):
        yield text.count("\n", 0, span.start()) + 1, " ".join(span.group(1).split())


def _words(text: str) -> list[str]:
    # A placeholder of several words (`<client id>`) is one.
    text = re.sub(r"<[^<>]*>", lambda m: "_".join(m.group().split()), text)
    try:
        return shlex.split(text)
    except ValueError:  # a quote a synopsis leaves open
        return text.split()


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _option(parser: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    return next((a for a in parser._actions if name in a.option_strings), None)


def _placeholder(word: str) -> bool:
    """A value the reader fills in: NAME, SEQ:HASH, <id>, $VAR, a value elided (sha256:...)."""
    return bool(
        re.fullmatch(
            r"[A-Z][A-Z0-9_]*(?:[:=.,/-][A-Z][A-Z0-9_]*)*|<.*|.*>|\$.*|.*(?:\.\.\.|…).*", word
        )
    )


def _mistakes(words: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """What the words (after `bastion`) name that ``parser`` does not have: a command or
    sub-command, an option of the command named, a value outside an option's choices."""
    mistakes = []
    command = ["bastion"]
    words = [w.strip("[]") for w in words]
    words = [w for w in words if w not in ("", "...", "…")]
    i = 0
    options_ended = False
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            options_ended = True
            continue
        if word.startswith("-") and len(word) > 1 and not options_ended:
            name = word.split("=", 1)[0]
            if "|" in name:  # options that are alternatives (`--decisions|--events`): each
                mistakes += [
                    f"{' '.join(command)} has no option {alternative}"
                    for alternative in name.split("|")
                    if _option(parser, alternative) is None
                ]
                continue
            action = _option(parser, name)
            if action is None:
                mistakes.append(f"{' '.join(command)} has no option {name}")
                continue
            if action.nargs == 0:
                continue
            if "=" in word:
                value: str | None = word.split("=", 1)[1]
            elif i < len(words) and not words[i].startswith("-"):
                value = words[i]
                i += 1
            else:
                value = None
            if action.choices is not None and value is not None and not _placeholder(value):
                wrong = [v for v in value.split("|") if v not in action.choices]
                if wrong:
                    mistakes.append(
                        f"{' '.join(command)} {name} takes one of {sorted(action.choices)}, not {wrong}"
                    )
            continue
        sub = _subparsers(parser)
        if sub is None:
            continue  # a positional argument
        if word not in sub.choices:
            if not _placeholder(word):
                mistakes.append(f"{' '.join(command)} has no sub-command {word!r}")
            break
        command.append(word)
        parser = sub.choices[word]
    return mistakes


def _or_placeholder(convert: Callable[[str], object]) -> Callable[[str], object]:
    def value(text: str) -> object:
        return text if _placeholder(text) else convert(text)

    return value


class _Choices(list):
    """An option's choices, and any placeholder."""

    def __contains__(self, value: object) -> bool:
        return (isinstance(value, str) and _placeholder(value)) or super().__contains__(value)


def _parse_error(words: list[str]) -> str | None:
    """What the parser says of ``words`` taken as given, None when it takes them."""
    parser, errors = _refusing_parser()
    errors.clear()
    try:
        parser.parse_args(words)
    except SystemExit:
        return errors[0] if errors else "exits"
    return None


@functools.cache
def _refusing_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """bastion's parser, taking a placeholder wherever a value goes, and writing what it refuses
    into the list it comes with instead of exiting. Made once (a parser for each of the docs'
    commands took most of the test's time): parsing changes nothing of it."""
    parser = build_parser()
    errors: list[str] = []

    def refuse(message: str) -> None:
        errors.append(message)
        raise SystemExit(2)

    stack = [parser]
    while stack:
        p = stack.pop()
        p.error = refuse  # type: ignore[method-assign]
        for action in p._actions:
            # A placeholder stands for a value the option or argument takes.
            if action.type is not None and callable(action.type):
                action.type = _or_placeholder(action.type)
            if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
                action.choices = _Choices(action.choices)
        if (sub := _subparsers(p)) is not None:
            stack.extend(sub.choices.values())
    return parser, errors


def _forms(words: list[str]) -> list[list[str]]:
    """The commands a synopsis stands for: without its [optional] parts, and with all of them,
    taking the first of each `A|B` (a word) or `[A | B]` (a part's) alternatives, then the
    second, ... A `...` after an option stands for its value; elsewhere (`[--scope ...]`,
    `--name N ...`) for more of what came before, and is left out."""

    def parse(i: int, stop: str) -> tuple[list, int]:
        # -> (alternatives, each a list of items: a word, or ("optional", alternatives))
        alternatives: list[list] = [[]]
        while i < len(words):
            word = words[i]
            if word == stop:
                return alternatives, i + 1
            if word == "|":
                alternatives.append([])
                i += 1
            elif word == "[":
                inner, i = parse(i + 1, "]")
                alternatives[-1].append(("optional", inner))
            else:
                alternatives[-1].append(word)
                i += 1
        return alternatives, i

    split: list[str] = []  # the brackets off their words: "[--json]" -> "[", "--json", "]"
    for word in words:
        opening = len(word) - len(word.lstrip("["))
        closing = len(word) - len(word.rstrip("]"))
        core = word[opening : len(word) - closing] if closing < len(word) else ""
        split += ["["] * opening + ([core] if core else []) + ["]"] * closing
    words = split
    tree, _ = parse(0, "")
    tree = tree[0] if len(tree) == 1 else [("optional", tree)]

    def expand(items: list, choice: int, optional: bool) -> list[str]:
        out: list[str] = []
        for item in items:
            if isinstance(item, tuple):
                if optional:
                    alternatives = item[1]
                    out += expand(alternatives[min(choice, len(alternatives) - 1)], choice, True)
            elif item in ("...", "…"):
                if out and out[-1].startswith("-") and "=" not in out[-1]:
                    out.append("VALUE")
            else:
                alternatives = item.split("|") if "|" in item.strip("|") else [item]
                out.append(alternatives[min(choice, len(alternatives) - 1)])
        return out

    most = max(1, words.count("|") + 1, *(len(word.split("|")) for word in words))
    forms = [expand(tree, 0, False)]
    for choice in range(most):
        form = expand(tree, choice, True)
        if form not in forms:
            forms.append(form)
    return forms


def _named_only(words: list[str], parser: argparse.ArgumentParser) -> bool:
    """Whether ``words`` name a command (`bastion users disable`), or its options, their values
    elided (`bastion approvals list --limit`, `bastion clients create --scope ...`), in prose,
    rather than write out a command to type."""
    for word in words:
        sub = _subparsers(parser)
        if sub is not None and word in sub.choices:
            parser = sub.choices[word]
        elif not word.startswith("-") and word not in ("...", "…"):
            return False
    return True


def test_every_bastion_command_the_docs_show_is_one_the_cli_has():
    parser = build_parser()
    wrong = []
    seen = parsed = 0
    for command in _commands():
        seen += 1
        words = _words(command.text)[1:]
        mistakes = _mistakes(words, parser)
        if not mistakes and not (command.program == "" and _named_only(words, parser)):
            parsed += 1
            for form in _forms(words):
                error = _parse_error(form)
                if error is not None:
                    mistakes = [f"{error} (as {' '.join(['bastion', *form])!r})"]
                    break
        wrong += [f"{command.file}:{command.line}: {command.text!r}: {m}" for m in mistakes]
    assert seen > 100, f"only {seen} commands found in the docs: is the extraction broken?"
    assert parsed > 100, f"only {parsed} commands parsed: is the extraction broken?"
    assert not wrong, "commands in the docs the CLI does not have:\n" + "\n".join(wrong)


# A program a code block runs by name: python, python3, python3.11.
_PYTHON = re.compile(
    r"(?:^\s*(?:\$\s+)?|[|;&]\s*|\$\()(?P<program>(?:[\w./$()-]*/)?python[\d.]*)\s"
)


def test_the_readme_runs_bastion_and_python_from_the_venv_make_creates():
    # README.md's newcomer has run `make run`, which creates .venv/ and puts nothing on PATH:
    # `bastion` is not found, `python` is not found (Debian) or one without bastion installed.
    readme = ROOT / "README.md"
    typed = [(c.line, c.program) for c in _commands() if c.file == "README.md" and c.program]
    typed += [
        (block.line + n, found.group("program"))
        for block in _blocks(readme)
        if block.language in _SHELL_LANGUAGES
        for n, line in enumerate(block.text.split("\n"))
        for found in _PYTHON.finditer(_COMMENT.sub("", line))
    ]
    assert len(typed) > 5, f"only {len(typed)} commands found in README.md's code blocks"
    wrong = [
        f"README.md:{n}: {program}" for n, program in typed if not program.startswith(".venv/bin/")
    ]
    assert not wrong, "README.md runs these outside .venv/bin/:\n" + "\n".join(wrong)


# -- TOML examples -----------------------------------------------------------------------------

# A commented-out setting shown with its default (`# user_claim = "sub"`): a reader uncomments it.
_COMMENTED_KEY = re.compile(r"^(\s*)#\s*([A-Za-z_][\w-]*\s*=\s*\S)", re.M)
# What an example leaves to the reader's deployment when it shows only a part of bastion.toml:
# the authorization server's issuer and one protected resource, two upstreams ("desk", "files",
# the names the guides use) for [gateway] tables that name none.
_ISSUER = "https://auth.example.com"
_BASE_OAUTH = {
    "issuer": _ISSUER,
    "key_dir": "/var/lib/bastion/oauth-keys",
    "resources": [{"uri": "https://mcp.example.com/mcp/desk", "scopes": ["tools:call"]}],
}
_BASE_UPSTREAMS = [
    {"name": "desk", "command": "python3", "args": ["server.py"]},
    {"name": "files", "url": "http://127.0.0.1:9000/mcp"},
]


def _environment(text: str) -> dict[str, str]:
    """The variables an example names (`${NAME}`, `secret_env = "NAME"`), each set as a reader
    would: a URL for a *_URL variable, else a secret long enough for every reader, each its
    own (a new and a previous secret are not the same)."""
    names = set(re.findall(r"\$\{(\w+)\}", text)) | set(
        re.findall(r"^\s*#?\s*\w+_env\s*=\s*\"(\w+)\"", text, re.M)
    )
    return {
        name: "https://hooks.example.com/placeholder" if name.endswith("URL") else name + "s" * 32
        for name in names
    }


def _read_as_bastion_serve(text: str, tmp: Path) -> list[object]:
    """Read ``text`` as `bastion serve` reads bastion.toml, each table by the reader that
    `bastion serve` hands it to (`create_app`): what they read, or what the first refuses."""
    from bastion.approvals.settings import ApprovalSettings
    from bastion.gateway.config import GatewayConfig
    from bastion.identity.providers import IdentitySettings
    from bastion.oauth.settings import OAuthSettings
    from bastion.server.config import ServerConfig
    from bastion.signals.alerts import AlertSettings
    from bastion.signals.posture import PostureSettings
    from bastion.signals.settings import SsfSettings
    from bastion.signals.store import SignalSettings

    env = _environment(text)
    file = tmp / "bastion.toml"
    file.write_text(text, encoding="utf-8")
    # The file's tables, [server]'s keys and values, [signals.behavior] and [tasks].
    config = ServerConfig.load(file, env={})
    # (config holds the other tables as written: each is read below by its own reader.)
    read: list[object] = [config.task_settings()]
    if config.oauth:
        read.append(OAuthSettings.from_mapping(_BASE_OAUTH | config.oauth))
    if config.gateway:
        table = {"upstreams": _BASE_UPSTREAMS} | config.gateway
        read.append(GatewayConfig.from_mapping(table, env))
    if config.identity:
        read.append(IdentitySettings.from_mapping(config.identity, env))
    if config.approvals:
        read.append(ApprovalSettings.from_mapping(config.approvals, env))
    signals = config.signals
    if "ssf" in signals:
        read.append(SsfSettings.from_table(signals["ssf"], issuer=_ISSUER, env=env))
    if "api" in signals:
        read.append(SignalSettings.from_mapping(signals["api"]))
    if "posture" in signals:
        read.append(PostureSettings.from_mapping(signals["posture"]))
    if "alerts" in signals:
        read.append(AlertSettings.from_mapping(signals["alerts"], env))
    return read


def _unexpanded(value: object, where: str = "") -> Iterator[str]:
    """Where a setting read still holds a `${NAME}` (the variable was not read)."""
    if isinstance(value, str):
        if "${" in value:
            yield f"{where} = {value!r}"
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from _unexpanded(getattr(value, f.name), f"{where}.{f.name}".lstrip("."))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _unexpanded(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _unexpanded(item, f"{where}[{i}]")


def test_every_toml_example_is_a_configuration_bastion_reads(tmp_path):
    wrong = []
    seen = 0
    for path in _documents():
        for block in _blocks(path):
            if block.language != "toml":
                continue
            seen += 1
            # As shown, and with every setting shown commented out put in force.
            for text in (block.text, _COMMENTED_KEY.sub(r"\1\2", block.text)):
                try:
                    read = _read_as_bastion_serve(text, tmp_path)
                except (ValueError, TypeError) as e:
                    wrong.append(f"{block.file}:{block.line}: {e}")
                    break
                # A ${NAME} the docs show is read from the environment, never kept as written.
                literal = [w for settings in read for w in _unexpanded(settings)]
                if literal:
                    wrong.append(f"{block.file}:{block.line}: taken as written: {literal}")
                    break
    assert seen > 10, f"only {seen} TOML examples found in the docs: is the extraction broken?"
    assert not wrong, "TOML examples bastion refuses:\n" + "\n".join(wrong)


# -- make targets ------------------------------------------------------------------------------


def _makefile_targets() -> set[str]:
    """The targets the Makefile has rules for (`name: ...`, not `NAME := ...`)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set()
    for rule in re.finditer(r"^([^\s#:=][^:=]*):(?![=])", text, re.M):
        targets.update(rule.group(1).split())
    return targets


def _make_commands() -> Iterator[tuple[str, int, str]]:
    """(file, line, target) of each `make <target>` shown as code: in a code block a person
    types, or inline (`make run`)."""
    for path in _documents():
        name = str(path.relative_to(ROOT))
        shown = [
            (block.line + n, line)
            for block in _blocks(path)
            if block.language in _SHELL_LANGUAGES
            for n, line in enumerate(block.text.split("\n"))
        ]
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            shown += [(number, span) for span in re.findall(r"`(make [^`]*)`", line)]
        for number, text in shown:
            command = re.match(r"\s*(?:\$\s+)?make\s+(.*)", _COMMENT.sub("", text))
            if command is None:
                continue
            # Variables may come first: make PYTHON=python3.12 run.
            words = [w for w in command.group(1).split() if "=" not in w]
            if words:
                yield name, number, words[0]


def test_every_make_target_the_docs_name_is_one_the_makefile_has():
    targets = _makefile_targets()
    assert {"run", "test"} <= targets, f"the Makefile's rules were not read: {targets}"
    named = list(_make_commands())
    assert any(f == "README.md" for f, _, _ in named), "no `make` command found in README.md"
    wrong = [f"{f}:{n}: make {t}" for f, n, t in named if t not in targets]
    assert not wrong, (
        f"make targets the Makefile does not have (it has {sorted(targets)}):\n" + "\n".join(wrong)
    )


# -- settings tables' defaults -----------------------------------------------------------------


@dataclass(frozen=True)
class SettingRow:
    file: str
    line: int
    key: str  # as the first cell writes it, without its backticks
    default: str  # the second cell, as written


def _settings_tables() -> Iterator[tuple[str, int, list[SettingRow]]]:
    """(file, line, rows) of each table of settings and their defaults in docs/: its header's
    second cell is `default`, the first cell of its first row a `key` in code."""
    for path in sorted((ROOT / "docs").glob("*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        name = str(path.relative_to(ROOT))
        for n, line in enumerate(lines):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if not line.startswith("|") or len(cells) < 3 or cells[1] != "default":
                continue
            rows = []
            for m in range(n + 2, len(lines)):
                if not lines[m].startswith("|"):
                    break
                row = [c.strip() for c in lines[m].split("|")[1:-1]]
                rows.append(SettingRow(name, m + 1, row[0], row[1]))
            if rows and rows[0].key.startswith("`"):
                yield name, n + 1, rows


def _settings_read(tmp: Path) -> dict[str, Callable[[str], object]]:
    """What each settings table documents, by its file and first key: the function that gives
    the value bastion uses for a key of it that bastion.toml leaves out, as `bastion serve`
    reads the table (an upstream, a provider, a webhook given only what they require)."""
    from bastion.approvals.settings import ApprovalSettings
    from bastion.connections.settings import UpstreamOAuth
    from bastion.gateway.config import GatewayConfig
    from bastion.identity.providers import IdentitySettings
    from bastion.oauth.settings import OAuthSettings
    from bastion.server.config import ServerConfig
    from bastion.signals.behavior import BehaviorSettings

    file = tmp / "empty.toml"
    file.write_text("", encoding="utf-8")
    server = ServerConfig.load(file, env={})
    gateway = GatewayConfig.from_mapping({"upstreams": _BASE_UPSTREAMS[:1]}, {})
    oauth = OAuthSettings.from_mapping(_BASE_OAUTH)
    env = {"SECRET": "s" * 32}
    hook = {"url": "https://hooks.example.com/a", "secret_env": "SECRET"}
    approvals = ApprovalSettings.from_mapping({"webhooks": [hook]}, env)
    provider = {
        "id": "corp",
        "issuer": "https://idp.example.com",
        "client_id": "bastion",
        "client_secret": "${SECRET}",
    }
    identity = IdentitySettings.from_mapping({"providers": [provider]}, env)

    def of(*owners: tuple[str, object]) -> Callable[[str], object]:
        """A key's value: of the first owner whose prefix the key starts with (`identity.`,
        `[oauth.login] `, `webhooks[].`; "" for any), by the key's name (a `*_env` key by
        what it reads: `previous_secret_env` is `previous_secret`)."""

        def value(key: str) -> object:
            for prefix, owner in owners:
                if key.startswith(prefix):
                    name = key.removeprefix(prefix)
                    if not hasattr(owner, name):
                        name = name.removesuffix("_env")
                    return getattr(owner, name)
            raise AttributeError(key)

        return value

    login_tables = [
        (f"[oauth.{name}] ", getattr(oauth, name))
        for name in (
            "login",
            "open_registration",
            "client_metadata",
            "ciba",
            "client_assertion",
            "dpop",
            "refusal_audit",
        )
    ]
    return {
        "docs/operations.md host": of(("", server)),
        "docs/authzen.md authzen_max_evaluations": of(("", server)),
        "docs/oso-cloud.md oso_api_max_results": of(("", server)),
        "docs/policy-language.md policy_max_bytes": of(("", server)),
        "docs/gateway.md public_url": of(("", gateway)),
        "docs/gateway.md name": of(("", gateway.upstreams[0])),
        "docs/delegation.md label_ttl_seconds": of(("", gateway)),
        "docs/delegation.md max_seconds": of(("", server.task_settings())),
        "docs/approvals.md expiry_seconds": of(("", approvals)),
        "docs/approvals.md webhooks[].url": of(
            ("webhooks[].", approvals.webhooks[0]), ("", approvals)
        ),
        "docs/approvals.md request_seconds": of(("", oauth.ciba)),
        "docs/identity.md identity.local_passwords": of(
            ("identity.", identity), ("", identity.providers[0])
        ),
        "docs/identity.md max_age_seconds": of(("", oauth.dpop)),
        "docs/identity.md issuer": of(("", UpstreamOAuth.from_mapping({}, "oauth"))),
        "docs/oauth.md [oauth.login] max_failures_per_user": of(*login_tables),
        "docs/signals.md baseline_weight": of(("", BehaviorSettings.from_table({}))),
    }


# A default that says the setting holds nothing: (none), none, unset, {}, [].
_NOTHING = re.compile(r"\(?(?:none|unset)\b\)?.*|\{\}|\[\]")
_WHOLE_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _default_mismatch(written: str, value: object) -> str | None:
    """How the value bastion uses differs from the default a table's cell writes; None when it
    is the same, or when the cell says it in words (`the issuer's origin`, `required`), which
    only a reader can check. The cell's first part counts: what follows in parentheses, or
    after a `;`, explains it."""
    cell = re.split(r"\s\(|;", written, maxsplit=1)[0].strip()
    literal = cell.strip("`")
    if _NOTHING.fullmatch(literal):
        same = not value and value is not False and value != 0
    elif literal in ("true", "false"):
        same = value is (literal == "true")
    elif re.fullmatch(_WHOLE_NUMBER.pattern + r"(?:\s.*)?", literal) and not re.match(
        r"\d+\.\d+\.", literal
    ):
        number = float(_WHOLE_NUMBER.match(literal).group().replace(",", ""))
        same = isinstance(value, int | float) and not isinstance(value, bool) and value == number
    elif isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        items = literal.strip("[]").replace('"', "").replace("`", "").split(",")
        same = [i.strip() for i in items] == list(value)
    elif cell.startswith("`") and re.fullmatch(r'"?[\w./:-]+"?', literal):
        same = value == literal.strip('"')
    else:
        return None
    return None if same else f"the code's default is {value!r}"


def test_every_default_a_settings_table_gives_is_the_one_bastion_uses(tmp_path):
    reading = _settings_read(tmp_path)
    wrong = []
    checked = 0
    for file, line, rows in _settings_tables():
        table = f"{file} {rows[0].key.split('`')[1]}"
        if table not in reading:
            wrong.append(
                f"{file}:{line}: a settings table (first key {rows[0].key}) this test does not"
                " read: add it to _settings_read"
            )
            continue
        for row in rows:
            key = row.key.strip("`")
            if not re.fullmatch(r"(?:\[[\w.]+\] |[\w.]+\.|\w+\[\]\.)?\w+", key):
                continue  # several keys in one row (`client_id`, `client_secret`)
            try:
                value = reading[table](key)
            except AttributeError:
                wrong.append(f"{row.file}:{row.line}: {key}: no such setting")
                continue
            checked += 1
            if (mismatch := _default_mismatch(row.default, value)) is not None:
                wrong.append(
                    f"{row.file}:{row.line}: {key}: the docs say {row.default!r}, {mismatch}"
                )
    assert checked > 100, f"only {checked} defaults checked: are the tables read?"
    assert not wrong, "defaults the docs give that bastion does not use:\n" + "\n".join(wrong)
