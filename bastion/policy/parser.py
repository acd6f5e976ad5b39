"""Tokens to the syntax tree. A syntax error names what was expected and where."""

from __future__ import annotations

from bastion.facts.model import Entity
from bastion.policy import ast
from bastion.policy.builtins.constants import CONSTANTS
from bastion.policy.errors import Diagnostic, PolicyError
from bastion.policy.lexer import Token, tokenize
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits

_COMPARISONS = {"==", "!=", "<", "<=", ">", ">=", "="}
# Oso Cloud's object literals of primitive types: ``String{"a"}`` is ``"a"``.
_LITERAL_TYPES = {"String": str, "Integer": int, "Boolean": bool}


class _Parser:
    def __init__(
        self, tokens: list[Token], text: str = "", limits: PolicyLimits = DEFAULT_LIMITS
    ) -> None:
        self.tokens = tokens
        self.text = text
        self.pos = 0
        self.limits = limits
        self.depth = 0  # parentheses, 'not', lists and objects open around the current token

    def nest(self, token: Token) -> None:
        """Enter one more level of nesting at ``token``; refuse a policy nested too deep (the
        parser, the checks and the compiler all recurse on nesting)."""
        self.depth += 1
        if self.depth > self.limits.policy_max_nesting:
            raise PolicyError(
                [
                    Diagnostic(
                        token.location,
                        f"nested more than {self.limits.policy_max_nesting} levels deep "
                        "(parentheses, 'not', 'forall', lists, objects and arithmetic operators);"
                        " the limit is "
                        f"policy_max_nesting = {self.limits.policy_max_nesting}",
                    )
                ]
            )

    def check_size(self, token: Token, size: int, what: str) -> None:
        limit = self.limits.policy_max_term_size
        if size > limit:
            raise PolicyError(
                [
                    Diagnostic(
                        token.location,
                        f"{what} holds {size} values, more than {limit}; the limit is "
                        f"policy_max_term_size = {limit}",
                    )
                ]
            )

    def source_since(self, start: Token) -> str:
        """The source text from ``start`` up to the ';' just read, on one line."""
        end = self.tokens[self.pos - 1]
        return " ".join(self.text[start.offset : end.offset].split())

    # -- token helpers ----------------------------------------------------------------------

    @property
    def tok(self) -> Token:
        return self.tokens[self.pos]

    def peek(self, offset: int = 1) -> Token:
        return self.tokens[min(self.pos + offset, len(self.tokens) - 1)]

    def at(self, value: str, kind: str | None = None) -> bool:
        t = self.tok
        return t.value == value and t.kind in ((kind,) if kind else ("op", "keyword", "name"))

    def advance(self) -> Token:
        t = self.tok
        self.pos += 1
        return t

    def fail(self, expected: str, token: Token | None = None) -> PolicyError:
        token = token or self.tok
        return PolicyError(
            [Diagnostic(token.location, f"expected {expected}, found {token.describe()}")]
        )

    def expect(self, value: str, what: str | None = None) -> Token:
        if not self.at(value):
            raise self.fail(what or f"'{value}'")
        return self.advance()

    def expect_kind(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            raise self.fail(what)
        return self.advance()

    def more(self, end: str) -> bool:
        """After an item of a list closed by ``end``: True when another item follows (a ','
        not followed by ``end``); a trailing comma is allowed."""
        if not self.at(","):
            return False
        self.advance()
        return not self.at(end)

    # -- top level --------------------------------------------------------------------------

    def policy(self) -> ast.Policy:
        policy = ast.Policy()
        while self.tok.kind != "eof":
            t = self.tok
            if (
                t.kind == "name"
                and t.value in ("actor", "resource")
                and self.peek().kind == "name"
                or t.kind == "name"
                and t.value == "global"
                and self.peek().value == "{"
            ):
                policy.blocks.append(self.block())
            elif t.kind == "name" and t.value == "test" and self.peek().kind == "string":
                policy.tests.append(self.test_block())
            elif (
                t.kind == "name"
                and t.value == "test"
                and self.peek().value == "fixture"
                and self.peek(2).kind == "name"
            ):
                policy.fixtures.append(self.fixture_block())
            elif t.kind == "name" and t.value == "declare" and self.peek().kind == "name":
                policy.declares.append(self.declare())
            elif t.kind == "name":
                policy.rules.append(self.rule())
            else:
                raise self.fail(
                    "a rule, a declaration, an actor/resource/global block or a test block"
                )
        return policy

    def block(self) -> ast.Block:
        kind_tok = self.advance()
        name = None
        extends: list[str] = []
        if kind_tok.value != "global":
            name = self.expect_kind("name", "a type name").value
            if self.tok.kind == "name" and self.tok.value == "extends":
                self.advance()
                extends.append(self.expect_kind("name", "a type name after 'extends'").value)
                while self.more("{"):
                    extends.append(self.expect_kind("name", "a type name").value)
        block = ast.Block(kind_tok.value, name, kind_tok.location, tuple(extends))
        self.expect("{")
        while not self.at("}"):
            t = self.tok
            if (
                t.kind == "name"
                and t.value in ("roles", "permissions")
                and self.peek().value == "="
            ):
                self.advance()
                self.expect("=")
                target = block.roles if t.value == "roles" else block.permissions
                for s in self.string_list():
                    if s.value in target:
                        raise PolicyError(
                            [
                                Diagnostic(
                                    s.location, f"{t.value[:-1]} {s.value!r} is declared twice"
                                )
                            ]
                        )
                    target[s.value] = s.location
                self.expect(";")
            elif t.kind == "name" and t.value == "relations" and self.peek().value == "=":
                self.advance()
                self.expect("=")
                self.expect("{")
                while not self.at("}"):
                    rel = self.expect_kind("name", "a relation name")
                    self.expect(":")
                    typ = self.expect_kind("name", "a type name")
                    block.relations[rel.value] = (typ.value, typ.location)
                    if not self.more("}"):
                        break
                self.expect("}", "',' or '}'")
                self.expect(";")
            elif t.kind == "string" or t.kind == "name" and self.peek().value == "if":
                head = self.advance()
                self.expect("if", "'if'")
                body = self.expr(shorthand=True)
                self.expect(";", "'and', 'or' or ';'")
                block.shorthand.append(
                    ast.ShorthandRule(
                        head.value, head.location, body, head.location, head.kind == "name"
                    )
                )
            else:
                raise self.fail(
                    "roles = [...], permissions = [...], relations = {...}, a shorthand rule or '}'"
                )
        self.advance()
        return block

    def string_list(self) -> list[Token]:
        self.expect("[")
        items = []
        if not self.at("]"):
            items.append(self.expect_kind("string", "a string"))
            while self.more("]"):
                items.append(self.expect_kind("string", "a string"))
        self.expect("]", "',' or ']'")
        return items

    def declare(self) -> ast.Declare:
        start = self.advance()
        name = self.expect_kind("name", "a predicate name").value
        self.expect("(")
        types = []
        if not self.at(")"):
            types.append(self.expect_kind("name", "a type name").value)
            while self.more(")"):
                types.append(self.expect_kind("name", "a type name").value)
        self.expect(")", "',' or ')'")
        self.expect(";")
        return ast.Declare(name, tuple(types), start.location)

    def rule(self) -> ast.Rule:
        name_tok = self.expect_kind("name", "a rule name")
        self.expect("(", "'(' after the rule name")
        params = []
        if not self.at(")"):
            params.append(self.param())
            while self.more(")"):
                params.append(self.param())
        self.expect(")", "',' or ')'")
        self.check_size(name_tok, len(params), "this rule's head")
        body = None
        if self.at("if"):
            self.advance()
            body = self.expr(shorthand=False)
        self.expect(";", "'if' or ';'" if body is None else "'and', 'or' or ';'")
        return ast.Rule(
            name_tok.value, tuple(params), body, name_tok.location, self.source_since(name_tok)
        )

    def param(self) -> ast.Param:
        loc = self.tok.location
        term = self.term()
        typ = None
        if self.at(":"):
            self.advance()
            typ = self.expect_kind("name", "a type name after ':'").value
        return ast.Param(term, typ, loc)

    def fixture_block(self) -> ast.Fixture:
        start = self.advance()
        self.advance()  # 'fixture'
        name = self.advance().value
        return ast.Fixture(name, tuple(self.setup_facts()), start.location)

    def setup_facts(self) -> list[ast.Call | ast.FixtureRef]:
        """``{ fact; fixture name; ... }``."""
        self.expect("{")
        facts: list[ast.Call | ast.FixtureRef] = []
        while not self.at("}"):
            t = self.tok
            if t.kind == "name" and t.value == "fixture" and self.peek().kind == "name":
                self.advance()
                facts.append(ast.FixtureRef(self.advance().value, t.location))
            else:
                facts.append(self.call())
            self.expect(";")
        self.advance()
        return facts

    def assertion_call(self) -> tuple[ast.Call, dict[str, str]]:
        """The call of an assertion, whose arguments may be typed variables (``x: String``)."""
        name = self.expect_kind("name", "a predicate name")
        self.expect("(", "'('")
        args: list[ast.Term] = []
        typed: dict[str, str] = {}
        while not self.at(")"):
            term = self.term()
            if isinstance(term, ast.Var) and self.at(":"):
                self.advance()
                typed[term.name] = self.expect_kind("name", "a type name after ':'").value
            args.append(term)
            if not self.more(")"):
                break
        self.expect(")", "',' or ')'")
        self.check_size(name, len(args), "this call")
        return ast.Call(name.value, tuple(args), name.location), typed

    def test_block(self) -> ast.TestBlock:
        start = self.advance()
        name = self.advance().value
        self.expect("{")
        setup: list[ast.Call | ast.FixtureRef] = []
        assertions: list[ast.Assertion] = []
        while not self.at("}"):
            t = self.tok
            if t.kind == "name" and t.value == "setup":
                self.advance()
                setup.extend(self.setup_facts())
            elif t.kind == "name" and t.value in ("assert", "assert_not"):
                self.advance()
                call, typed = self.assertion_call()
                if len(typed) > 1:
                    raise PolicyError(
                        [Diagnostic(call.location, "an assertion has at most one variable")]
                    )
                iff = None
                if self.tok.kind == "name" and self.tok.value == "iff":
                    iff_tok = self.advance()
                    var = self.expect_kind("name", "the typed variable after 'iff'")
                    if var.value not in typed:
                        raise PolicyError(
                            [
                                Diagnostic(
                                    var.location,
                                    f"'iff' needs {var.value} to be a typed variable of the"
                                    f" call ({var.value}: Type)",
                                )
                            ]
                        )
                    self.expect("in", "'in'")
                    values = self.term()
                    if not isinstance(values, ast.ListTerm):
                        raise self.fail("a list of values after 'in'", iff_tok)
                    iff = (var.value, typed[var.value], values)
                elif typed:
                    # A variable without 'iff': assert that some value holds (assert_not: none).
                    ((var_name, type_name),) = typed.items()
                    iff = (var_name, type_name, None)
                context = None
                if self.tok.kind == "name" and self.tok.value == "with":
                    self.advance()
                    if not (self.tok.kind == "name" and self.tok.value == "context"):
                        raise self.fail("'context'")
                    self.advance()
                    context = self.dict_term()
                self.expect(";")
                assertions.append(
                    ast.Assertion(t.value == "assert", call, context, t.location, iff)
                )
            else:
                raise self.fail("setup { ... }, assert, assert_not or '}'")
        self.advance()
        return ast.TestBlock(name, tuple(setup), tuple(assertions), start.location)

    # -- expressions ------------------------------------------------------------------------

    def expr(self, shorthand: bool) -> ast.Expr:
        items = [self.conj(shorthand)]
        while self.at("or"):
            self.advance()
            items.append(self.conj(shorthand))
        return items[0] if len(items) == 1 else ast.Or(tuple(items))

    def conj(self, shorthand: bool) -> ast.Expr:
        items = [self.unary(shorthand)]
        while self.at("and"):
            self.advance()
            items.append(self.unary(shorthand))
        return items[0] if len(items) == 1 else ast.And(tuple(items))

    def unary(self, shorthand: bool) -> ast.Expr:
        if self.at("not"):
            self.nest(self.tok)
            loc = self.advance().location
            inner = self.unary(shorthand)
            self.depth -= 1
            return ast.Not(inner, loc)
        if self.at("("):
            self.nest(self.tok)
            self.advance()
            inner = self.expr(shorthand)
            self.expect(")", "'and', 'or' or ')'")
            self.depth -= 1
            return inner
        return self.literal(shorthand)

    def literal(self, shorthand: bool) -> ast.Expr:
        t = self.tok
        if shorthand and t.kind == "name" and t.value == "global" and self.peek().kind == "string":
            self.advance()
            name = self.advance()
            return ast.Shorthand(name.value, None, True, name.location)
        after = self.peek()
        if shorthand and (
            t.kind == "string"
            and after.value not in _COMPARISONS | {"in"}
            or t.kind == "name"
            and after.kind in ("op", "keyword")
            and after.value in ("on", ";", "and", "or", ")")
        ):
            self.advance()
            relation = None
            if self.at("on"):
                self.advance()
                relation = self.expect_kind("string", "a relation name (a string) after 'on'").value
            return ast.Shorthand(t.value, relation, False, t.location, t.kind == "name")
        if (
            t.kind == "keyword"
            and t.value in ("true", "false")
            and after.value not in _COMPARISONS | {"in", "matches"}
        ):
            self.advance()
            return ast.Truth(t.value == "true", t.location)
        if t.kind == "name" and t.value == "forall" and self.peek().value == "(":
            return self.forall()
        if t.kind == "name" and t.value == "cut" and self.peek().value in (";", "and", "or", ")"):
            raise PolicyError(
                [
                    Diagnostic(
                        t.location,
                        "'cut' is not supported: bastion evaluates rules as a set, in no order,"
                        " so there is no 'rest of the rules' to cut; say what must not hold with"
                        " 'not' instead",
                    )
                ]
            )
        if t.kind == "name" and self.peek().value == "(":
            return self.call()
        left = self.term()
        if self.at("matches"):
            self.advance()
            typ = self.expect_kind("name", "a type name after 'matches'")
            return ast.Matches(left, typ.value, t.location)
        op = self.tok
        if op.kind in ("op", "keyword") and op.value in _COMPARISONS | {"in"}:
            self.advance()
            return ast.Compare(op.value, left, self.term(), op.location)
        raise self.fail("a comparison (==, !=, <, <=, >, >=, =, in) or 'matches'")

    def forall(self) -> ast.ForAll:
        start = self.advance()
        self.nest(start)
        self.expect("(")
        condition = self.expr(shorthand=False)
        self.expect(",", "',' between the condition and what must hold")
        requirement = self.expr(shorthand=False)
        self.expect(")", "'and', 'or' or ')'")
        self.depth -= 1
        return ast.ForAll(condition, requirement, start.location)

    def call(self) -> ast.Call:
        name = self.expect_kind("name", "a predicate name")
        self.expect("(", "'('")
        args = []
        if not self.at(")"):
            args.append(self.term())
            while self.more(")"):
                args.append(self.term())
        self.expect(")", "',' or ')'")
        self.check_size(name, len(args), "this call")
        return ast.Call(name.value, tuple(args), name.location)

    # -- terms ------------------------------------------------------------------------------

    def term(self) -> ast.Term:
        """A value, with arithmetic: ``*``, ``/``, ``mod`` and ``rem`` before ``+`` and ``-``."""
        # Each operator nests the expression one level deeper (``a + b + c`` is ``(a + b) + c``):
        # counted against policy_max_nesting like parentheses, since every later stage
        # recurses on it.
        opened = self.depth
        left = self.product()
        while True:
            t = self.tok
            if t.kind == "op" and t.value in ("+", "-"):
                self.nest(t)
                self.advance()
                left = ast.Arith(t.value, left, self.product(), t.location)
            elif t.kind == "number" and self.text[t.offset : t.offset + 1] == "-":
                # ``x -1``: the lexer read a negative number; after a value it is a subtraction.
                self.nest(t)
                self.advance()
                right = ast.Const(-t.value, t.location)
                left = ast.Arith("-", left, right, t.location)
            else:
                self.depth = opened
                return left

    def product(self) -> ast.Term:
        opened = self.depth
        left = self.primary()
        while (
            self.tok.kind == "op"
            and self.tok.value in ("*", "/")
            or self.tok.kind == "name"
            and self.tok.value in ("mod", "rem")
        ):
            self.nest(self.tok)
            op = self.advance()
            left = ast.Arith(op.value, left, self.primary(), op.location)
        self.depth = opened
        return left

    def primary(self) -> ast.Term:
        t = self.tok
        if t.kind == "op" and t.value == "(":
            self.nest(t)
            self.advance()
            inner = self.term()
            self.expect(")", "an operator or ')'")
            self.depth -= 1
            return inner
        if t.kind in ("string", "number"):
            self.advance()
            return ast.Const(t.value, t.location)
        if t.kind == "keyword" and t.value in ("true", "false"):
            self.advance()
            return ast.Const(t.value == "true", t.location)
        if t.kind == "constant":
            if t.value not in CONSTANTS:
                known = ", ".join("@" + c for c in sorted(CONSTANTS))
                raise PolicyError(
                    [
                        Diagnostic(
                            t.location, f"unknown built-in constant @{t.value} (Polar has {known})"
                        )
                    ]
                )
            self.advance()
            return ast.ContextPath(("@" + t.value,), t.location)
        if t.kind == "op" and t.value == "[":
            self.nest(t)
            self.advance()
            items = []
            if not self.at("]"):
                items.append(self.term())
                while self.more("]"):
                    items.append(self.term())
            self.expect("]", "',' or ']'")
            self.depth -= 1
            term = ast.ListTerm(tuple(items), t.location)
            self.check_size(t, term_size(term), "this list")
            return term
        if t.kind == "name" and t.value in _LITERAL_TYPES and self.peek().value == "{":
            return self.typed_literal()
        if t.kind == "name":
            self.advance()
            if self.at("{"):
                brace = self.advance()
                if self.tok.kind == "string" and self.peek().value == "}":
                    id_tok = self.advance()
                    self.advance()
                    return ast.Const(Entity(t.value, id_tok.value), t.location)
                # bastion's extension: an id computed at evaluation (``Device{context.device.id}``).
                if self.at("}"):
                    raise self.fail(f'the id of the {t.value}, e.g. {t.value}{{"id"}}')
                self.nest(brace)
                id_term = self.term()
                self.expect("}", "an operator or '}'")
                self.depth -= 1
                return ast.EntityOf(t.value, id_term, t.location)
            if t.value == "context":
                path = []
                while self.at("."):
                    self.advance()
                    path.append(self.field_name())
                return ast.ContextPath(tuple(path), t.location)
            if self.at("."):
                raise PolicyError(
                    [Diagnostic(self.tok.location, "field lookup is only allowed on 'context'")]
                )
            return ast.Var(t.value, t.location)
        raise self.fail("a value or a variable")

    def typed_literal(self) -> ast.Const:
        """``String{"a"}``, ``Integer{3}``, ``Boolean{true}``: a value written as Oso Cloud's
        object literal of its type, meaning the value itself."""
        type_tok = self.advance()
        self.advance()  # '{'
        value_tok = self.tok
        if value_tok.kind in ("string", "number"):
            value = value_tok.value
        elif value_tok.kind == "keyword" and value_tok.value in ("true", "false"):
            value = value_tok.value == "true"
        else:
            raise self.fail(f"a {type_tok.value} value inside {type_tok.value}{{...}}")
        if value.__class__ is not _LITERAL_TYPES[type_tok.value]:
            raise PolicyError(
                [
                    Diagnostic(
                        value_tok.location, f"{value_tok.describe()} is not a {type_tok.value}"
                    )
                ]
            )
        self.advance()
        self.expect("}")
        return ast.Const(value, type_tok.location)

    def field_name(self) -> str:
        t = self.tok
        if t.kind in ("name", "keyword", "string"):
            self.advance()
            return str(t.value)
        raise self.fail("a field name after '.'")

    def dict_term(self) -> ast.DictTerm:
        self.nest(self.tok)
        start = self.expect("{")
        items = []
        if not self.at("}"):
            items.append(self.dict_item())
            while self.more("}"):
                items.append(self.dict_item())
        self.expect("}", "',' or '}'")
        self.depth -= 1
        term = ast.DictTerm(tuple(items), start.location)
        self.check_size(start, term_size(term), "this object")
        return term

    def dict_item(self) -> tuple[str, ast.Term]:
        key = self.field_name()
        self.expect(":")
        value = self.dict_term() if self.at("{") else self.term()
        return key, value


def term_size(term: ast.Term) -> int:
    """The values in a term: one, or for a list or object one plus those of its items."""
    if isinstance(term, ast.ListTerm):
        return 1 + sum(term_size(item) for item in term.items)
    if isinstance(term, ast.DictTerm):
        return 1 + sum(term_size(value) for _, value in term.items)
    return 1


def parse(text: str, source: str = "<policy>", limits: PolicyLimits = DEFAULT_LIMITS) -> ast.Policy:
    """Parse Polar text into a syntax tree; raise `PolicyError` on a syntax error or a text
    nested deeper than ``limits.policy_max_nesting``."""
    return _Parser(tokenize(text, source), text, limits).policy()


def parse_fact(text: str) -> tuple:
    """Parse the Polar text of one ground fact or pattern (``_`` is a wildcard) into a tuple."""
    p = _Parser(tokenize(text.strip().rstrip(";"), "<fact>"))
    call = p.call()
    if p.tok.kind != "eof":
        raise p.fail("end of the fact")
    args = []
    for term in call.args:
        if isinstance(term, ast.Const):
            args.append(term.value)
        elif isinstance(term, ast.Var) and term.name == "_":
            args.append(None)
        else:
            raise PolicyError(
                [Diagnostic(term.location, "a fact's arguments must be values or entities")]
            )
    return (call.name, *args)
