"""``lower`` ignores case without letting a letter that is not ASCII pass for an ASCII one.

Python's ``str.lower`` makes the Kelvin sign (U+212A) a "k" and İ (U+0130) an "i" and a dot
above. A mail system, DNS and most programs a tool reaches fold case in ASCII only (RFC 5321,
RFC 4343), so "kim@ban\\u212a.example" is not an address at bank.example; a policy checking
the lowered address against an ASCII domain must not take it for one.
"""

from __future__ import annotations

import sys

import pytest

from bastion import Authorizer, Entity, Variable
from bastion.policy.builtins.strings import lower, lowered

ANN, TOOL = Entity("User", "ann"), Entity("Tool", "send_email")
SEND_TO_BANK = """actor User {}
resource Tool {}
declare seen(Tool);
allow(_u: User, "call", _t: Tool) if
  lower(context.to, to) and ends_with(to, "@bank.example");
allow(_u: User, "read", _t: Tool) if lower(context.to, "kim@bank.example");
allow(_u: User, "list", _t: Tool) if lower(context.to, to) and starts_with(to, "admi");
"""


def answers(action: str, to: str) -> bool:
    """Whether ann may do ``action`` with ``to``, asked every way the engine answers (authorize,
    decide and its explanation, actions, list, query): each must say the same."""
    authz = Authorizer(SEND_TO_BANK)
    authz.facts.insert(("seen", TOOL))  # so that list knows the tool
    context = {"to": to}
    answer = authz.authorize(ANN, action, TOOL, context)
    decision = authz.decide(ANN, action, TOOL, context)
    assert decision.allowed == answer
    assert ("✓ allow(" in str(decision.explanation)) == answer
    assert (action in authz.actions(ANN, TOOL, context)) == answer
    assert authz.list(ANN, action, "Tool", context) == (["send_email"] if answer else [])
    rows = authz.query("allow", ANN, Variable("a"), TOOL, context=context)
    assert (("allow", ANN, action, TOOL) in rows) == answer
    return answer


@pytest.mark.parametrize(
    ("action", "to"),
    [
        ("call", "kim@ban\u212a.example"),
        ("call", "kim@BAN\u212a.EXAMPLE"),
        ("read", "kim@ban\u212a.example"),
        ("read", "\u212aim@bank.example"),
        ("list", "ADM\u0130N"),
        ("list", "adm\u0130n"),
    ],
)
def test_a_letter_that_is_not_ascii_never_lowers_into_an_ascii_one(action, to):
    assert not answers(action, to)


@pytest.mark.parametrize(
    ("action", "to"),
    [
        ("call", "Kim@BANK.Example"),
        ("read", "KIM@bank.EXAMPLE"),
        ("list", "ADMIN"),
        ("list", "AdMiNistrator"),
    ],
)
def test_ascii_letters_still_compare_without_case(action, to):
    assert answers(action, to)


def test_letters_that_are_not_ascii_still_lower_among_themselves():
    assert lowered("\u00c9LODIE@\u00c9COLE.EXAMPLE") == ("\u00e9lodie@\u00e9cole.example",)
    assert lowered("\u0394\u0399\u039a\u0397") == ("\u03b4\u03b9\u03ba\u03b7",)
    assert lower("\u00c9", "\u00e9")
    # The two kept as they are; what follows them lowers as usual.
    assert lowered("\u212aIM\u0130X") == ("\u212aim\u0130x",)


def test_sigma_lowers_alike_wherever_it_stands():
    """str.lower makes a final Σ ς and another σ; ``lower`` lowers each letter on its own, as
    the reference does, so the compiled engine and the explanation read one definition."""
    assert lowered("\u039f\u0394\u039f\u03a3") == ("\u03bf\u03b4\u03bf\u03c3",)


def test_no_character_that_is_not_ascii_lowers_to_one_that_is():
    """Over every code point: should a Unicode version give another letter an ASCII lower case,
    this fails rather than the policy."""
    everything = "".join(
        chr(i) for i in range(0x80, sys.maxunicode + 1) if not 0xD800 <= i <= 0xDFFF
    )
    (result,) = lowered(everything)
    assert not any(c.isascii() for c in result)
