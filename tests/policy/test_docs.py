"""Every policy example in docs/policy-language.md loads, and its test blocks pass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bastion.policy import load
from bastion.policy.testing import run_tests

DOC = Path(__file__).resolve().parents[2] / "docs" / "policy-language.md"
BLOCKS = re.findall(r"```polar\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_language_reference_has_examples():
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_documented_example_loads_and_its_tests_pass(index):
    loaded = load([(f"policy-language.md example {index + 1}", BLOCKS[index])])
    warnings = [str(w) for w in loaded.warnings]
    if "# fact types inferred" in BLOCKS[index]:
        # The example of inferred fact types shows the misspelling guard's warning, and no other.
        assert warnings and all("is taken as a fact type inferred" in w for w in warnings)
    else:
        assert not warnings, warnings
    results = run_tests(loaded)
    assert results, "each example carries at least one test block"
    for result in results:
        assert result.passed, (
            result.name,
            result.error,
            [a.text for a in result.assertions if not a.passed],
        )
