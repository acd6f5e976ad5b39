"""Two spellings of one thing: what the policy, a mask or an approval sees must be what the
upstream reads. Resources are decided by the literal text of their URI, and the MCP SDK's
resource templates percent-decode what they capture (``notes://%C3%A9mile``, ``notes://émile`` and
``notes://%c3%a9mile`` are all the note of ``émile`` to it); its 1.x ``AnyUrl`` (a WHATWG URL
parser) rewrites hosts, ports and paths. bastion takes one spelling of each URI and refuses the
others (docs/gateway.md)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.prompts.base import Prompt
from mcp.shared.exceptions import MCPError
from mcp.shared.uri_template import UriTemplate
from pydantic import AnyUrl, ValidationError

from bastion.facts.model import Entity
from bastion.gateway.uris import spelling_refused
from tests.oauth.support import free_socket, serve

from .support import Recorder, start

NAMES = MCPServer("names")


@NAMES.resource("notes://{who}")
def note(who: str) -> str:
    return f"the note of {who}"


@NAMES.resource("files://{+path}")
def file(path: str) -> str:
    return f"the file {path}"


@NAMES.resource("logs://{service}{?level}")
def logs(service: str, level: str = "info") -> str:
    return f"the {level} log of {service}"


# A tool, and tools named to pass for it: a Cyrillic s, a zero-width space, a fullwidth s, a
# trailing space; a prompt, and one with a Cyrillic i.
LOOK_ALIKES = ["\u0455end_email", "send\u200b_email", "\uff53end_email", "send_email "]


def _tool(name: str):
    def send(to: str) -> str:
        return f"{name!r} wrote to {to}"

    return send


def _prompt(name: str):
    def say() -> str:
        return f"{name!r} says hello"

    return say


for _name in ["send_email", *LOOK_ALIKES]:
    NAMES.add_tool(_tool(_name), name=_name)
for _name in ["greeting", "greet\u0456ng"]:
    NAMES.add_prompt(Prompt.from_function(_prompt(_name), name=_name))


# Each held resource in the one spelling bastion takes (as the SDK's templates expand it), then
# other spellings the SDK reads as the same resource.
HELD = {
    "notes://%C3%A9mile": [
        "notes://émile",  # the IRI: AnyUrl writes it as the URI, the template decodes both
        "notes://%c3%a9mile",  # lower-case hex
        "notes://%C3%A9mil%65",  # an encoded letter
        "notes://%C3%A9mile#top",  # a fragment
        "notes://%C3%A9mile\u200b",  # a zero-width space
    ],
    "files://team/payroll": [
        "files://team%2Fpayroll",  # {+path} reads %2F as /
        "files://team%2fpayroll",
        "files://team/payro%6C%6C",
        "files://team/./payroll",
        "files://team/payroll#",
    ],
    "logs://api?level=debug": [
        "logs://api?level=%64ebug",
        "logs://api?level=debug#x",  # the SDK drops the fragment
    ],
}
POLICY = (
    '\nallow(_actor, "read", _r: McpResource) if context.server = "names";\n'
    'allow(_actor, action, _t: Tool) if action in ["list", "call"] and context.server = "names";\n'
    'allow(_actor, action, _p: Prompt) if action in ["list", "get"] and context.server = "names";\n'
    'requires_approval(_user: User, "read", _r: McpResource) if context.server = "names" and\n'
    f"  context.uri in {list(HELD)!r};\n".replace("'", '"')
)


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    upstream = Recorder(NAMES.streamable_http_app(streamable_http_path="/mcp"))
    with (
        serve(upstream, free_socket()) as url,
        start(
            tmp_path_factory.mktemp("spellings"),
            policy_extra=POLICY,
            more_upstreams=({"name": "names", "url": f"{url}/mcp"},),
        ) as running,
    ):
        server = Entity("McpServer", "names")
        running.apply(
            [
                ("has_relation", server, "team", Entity("Team", "support")),
                ("has_role", Entity("User", "sam"), "user", server),
            ]
        )
        running.upstream = upstream
        yield running


def read(bastion, uris: list[str]) -> list:
    """Each URI read through bastion by the SDK's client: ("ok", text) or ("error", code)."""

    async def script(client, seen):
        seen["reads"] = []
        for uri in uris:
            try:
                result = await client.read_resource(uri)
                seen["reads"].append(("ok", result.contents[0].text))
            except MCPError as e:
                seen["reads"].append(("error", e.error.code))

    return bastion.sdk("sam", "names", "auto", script)["reads"]


@pytest.mark.parametrize("uri", list(HELD))
def test_a_held_resource_is_read_in_no_other_spelling(bastion, uri):
    """The held resource waits for approval in its one spelling, and each other spelling that
    the upstream's SDK reads as the same resource is refused (-32602) before it is decided: none
    reaches the upstream and reads it without the approval."""
    outcomes = read(bastion, [uri, *HELD[uri]])
    assert outcomes[0] == ("error", -32008), outcomes  # approval pending
    for other, outcome in zip(HELD[uri], outcomes[1:], strict=True):
        assert outcome == ("error", -32602), (other, outcome)


def test_other_resources_of_the_same_templates_are_read(bastion):
    outcomes = read(
        bastion, ["notes://ada", "notes://%C3%A9lise", "files://team/a%20b", "logs://api"]
    )
    assert outcomes == [
        ("ok", "the note of ada"),
        ("ok", "the note of élise"),
        ("ok", "the file team/a b"),
        ("ok", "the info log of api"),
    ]


def test_a_tool_or_prompt_named_to_pass_for_another_is_neither_offered_nor_called(bastion):
    """Names are matched as written, so an allow on ``send_email`` never reaches ``ѕend_email``;
    but a person reading an approval page or a record could take one for the other. A name that
    is not printable ASCII without surrounding spaces is not offered, and a request naming one is
    refused (-32602) before it is decided: it never reaches the upstream."""

    async def script(client, seen):
        seen["tools"] = [t.name for t in (await client.list_tools()).tools]
        seen["prompts"] = [p.name for p in (await client.list_prompts()).prompts]
        seen["calls"] = []
        for name in ["send_email", *LOOK_ALIKES]:
            try:
                result = await client.call_tool(name, {"to": "ada@example.com"})
                seen["calls"].append(("ok", result.content[0].text))
            except MCPError as e:
                seen["calls"].append(("error", e.error.code))
        try:
            await client.get_prompt("greet\u0456ng")
        except MCPError as e:
            seen["prompt"] = e.error.code

    seen = bastion.sdk("sam", "names", "auto", script)
    assert seen["tools"] == ["send_email"] and seen["prompts"] == ["greeting"]
    assert seen["calls"] == [
        ("ok", "'send_email' wrote to ada@example.com"),
        *[("error", -32602)] * len(LOOK_ALIKES),
    ]
    assert seen["prompt"] == -32602
    called = [
        m["params"]["name"]
        for m in bastion.upstream.messages()
        if m.get("method") in ("tools/call", "prompts/get")
    ]
    assert called == ["send_email"]


# -- the rule itself, against the SDK's own readings --------------------------------------------

# Characters that are trouble in a URI: delimiters, excluded ones, the percent sign, letters
# Unicode maps to others (fullwidth, long s, Kelvin), invisible and bidi ones, and a control.
_TRICKY = ":/?#[]@!$&'()*+,;=%\"<>\\^`{|} aZ.-_~é\uff45\u017f\u212a\u200b\u202e\u0301\x01"
_values = st.text(alphabet=_TRICKY, min_size=1, max_size=3)


def _respelled(data, text: str) -> str:
    """``text`` with each character written as it is or percent-encoded (UTF-8, either case)."""
    out = []
    for char in text:
        encoded = quote(char, safe="")
        way = data.draw(st.sampled_from(["as is", "upper", "lower"]))
        out.append(char if way == "as is" else encoded if way == "upper" else encoded.lower())
    return "".join(out)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["s://{id}", "s://{+path}", "s://x/{id}", "s://{id}{?q}", "s://h/{+path}"]),
    _values,
    st.data(),
)
def test_bastion_takes_at_most_one_spelling_of_what_an_sdk_template_reads(template, value, data):
    """Two spellings that bastion both takes are never read by the SDK's resource templates as
    the same resource."""
    parsed = UriTemplate.parse(template)
    prefix = template[: template.index("{")]

    def spelling() -> str:
        uri = prefix + _respelled(data, value)
        return uri + "?q=" + _respelled(data, value) if template.endswith("{?q}") else uri

    first, second = spelling(), spelling()
    if first == second or spelling_refused(first) or spelling_refused(second):
        return
    read = parsed.match(first)
    assert read is None or read != parsed.match(second), (first, second, read)


_hosts = st.sampled_from(
    [
        "example.com",
        "EXAMPLE.com",
        "ex%41mple.com",
        "exa%2Emple.com",
        "\uff45xample.com",
        "exa\u200bmple.com",
        "\u017ftripe.com",
        "\u212aey.com",
        "127.0.0.1",
        "127.1",
        "0x7f.0.0.1",
        "2130706433",
        "127.000.0.1",
        "[::1]",
        "[0:0::1]",
        "[::FFFF:1.2.3.4]",
        "[::ffff:102:304]",
        "localhost",
        "",
        "example.com.",
    ]
)
_ports = st.sampled_from(["", ":", ":443", ":80", ":21", ":8080", ":08080", ":0"])
_users = st.sampled_from(["", "@", "u@", "u:@", ":p@", "u:p@", "u%40x@"])
_paths = st.sampled_from(
    ["", "/", "/a", "/a/./b", "/a/../b", "/a/%2E%2E/b", "/a%2Fb", "/%7e", "/a|b", "/a'b", "/é"]
)
_queries = st.sampled_from(["", "?", "?a=b", "?a'b", "?a%27b", "?a=%41", "?a b", "?a=%26"])
_fragments = st.sampled_from(["", "#", "#x"])


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(["http", "https", "HTTPS", "ws", "wss", "ftp", "file", "notes"]),
    st.sampled_from(["://", ":/", ":///", ":"]),
    _users,
    _hosts,
    _ports,
    _paths,
    _queries,
    _fragments,
)
def test_a_uri_bastion_takes_is_one_the_sdks_url_type_leaves_as_it_is(
    scheme, slashes, user, host, port, path, query, fragment
):
    """A URI bastion takes reads as itself to ``AnyUrl`` (which an upstream on the 1.x SDK
    validates every resource URI with), or is not a URL to it at all: bastion never takes a
    spelling that such an upstream reads as another."""
    uri = f"{scheme}{slashes}{user}{host}{port}{path}{query}{fragment}"
    if spelling_refused(uri) is not None:
        return
    try:
        read_as = str(AnyUrl(uri))
    except ValidationError:
        return
    assert read_as == uri


def test_an_upstreams_uri_is_taken_in_the_one_spelling_or_not_at_all():
    """What an upstream names a resource by is read as RFC 3986 and 3987 read it, into the one
    spelling clients' URIs are taken in; what has no such spelling is None (dropped)."""
    from bastion.gateway.uris import spelling_refused, upstream_uri

    same = {
        "lab://open": "lab://open",
        "LAB://%6Fpen": "lab://open",
        "lab://%6fpen": "lab://open",
        "lab://open#line-3": "lab://open",
        "notes://émile": "notes://%C3%A9mile",
        "notes://%c3%a9mile": "notes://%C3%A9mile",
    }
    for sent, taken in same.items():
        assert upstream_uri(sent) == taken, sent
        assert spelling_refused(taken) is None
    for none in (
        "lab://op en",
        "lab://open%00",
        "lab://\ud800",
        "https://EXAMPLE.com/x",
        "https://example.com:443/x",
        "lab://a/../b",
        "lab://open?",
        "files:///a%2fb",
    ):
        assert upstream_uri(none) is None, none
