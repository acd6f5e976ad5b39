"""How large a policy may be, and how much work one evaluation may do.

Load limits bound what compiling costs: a policy over one of them is refused with a diagnostic
that names the limit. The evaluation budget bounds what one decision costs, in steps and in
time: an evaluation that spends it ends in a refusal (`EvaluationLimit`). Each field is named as
its setting in ``bastion.toml`` (the ``[server]`` table; ``BASTION_<NAME>`` in the environment).
"""

from __future__ import annotations

from dataclasses import dataclass

# The largest time bound: an evaluation that holds the event loop longer is bounded in nothing
# a client would notice (its request, and every other of the process, has timed out).
MAX_EVALUATION_MILLISECONDS = 60_000


@dataclass(frozen=True, slots=True)
class PolicyLimits:
    # -- load: checked before anything is compiled ----------------------------------------
    # Bytes of policy text, every source together.
    policy_max_bytes: int = 1_048_576
    # Rules once shorthand rules are expanded and ``or`` is distributed (each alternative of an
    # ``or`` is a rule of its own), for the whole policy.
    policy_max_rules: int = 10_000
    # Literals (calls, comparisons, type checks, negations) in one rule body, those inside a
    # ``not`` included.
    policy_max_rule_literals: int = 1_000
    # Nesting of parentheses, ``not``, lists and objects in the text.
    policy_max_nesting: int = 32
    # Values in one term written in the policy (a list counts its items, nested ones too), and
    # arguments of one call or rule head.
    policy_max_term_size: int = 1_000
    # Literals compiled for one question, every specialised version of every rule it reaches
    # counted (a rule called with different constants is compiled once per constant).
    policy_max_compiled_literals: int = 200_000
    # -- evaluation: per decision -----------------------------------------------------------
    # Values considered: facts, entities and list items a rule iterates over, answers of and
    # calls to recursive rules, and calls into large groups of rules.
    evaluation_max_steps: int = 1_000_000
    # Milliseconds one evaluation may run once its first chunk of steps is spent
    # (`runtime.STEP_CHUNK`, 10,000; the clock is read at each chunk after, so "about"): the
    # steps bound the work, this the time the event loop is held, however dear a policy's steps
    # are. At most `MAX_EVALUATION_MILLISECONDS`.
    evaluation_max_milliseconds: int = 100
    # Recursive calls in progress at once (a chain of parent relations as deep as this).
    evaluation_max_depth: int = 200
    # Values in one list built during evaluation (a list counts its items, nested ones too).
    evaluation_max_term_size: int = 10_000
    # Steps of one explanation (``decide``, an explained refusal). Its interpreter walks the
    # proofs one by one, each step tens of times dearer than a compiled one: on the evaluation
    # budget an explanation could take seconds where the decision took a millisecond.
    explanation_max_steps: int = 50_000

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.evaluation_max_milliseconds > MAX_EVALUATION_MILLISECONDS:
            raise ValueError(
                f"evaluation_max_milliseconds must be at most {MAX_EVALUATION_MILLISECONDS}"
                f" (a minute), got {self.evaluation_max_milliseconds}"
            )


DEFAULT_LIMITS = PolicyLimits()
