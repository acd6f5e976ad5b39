"""Oso's documented patterns, written as Oso Cloud writes them (examples/oso/), load unchanged and
pass their own test blocks, run the way a person runs them: ``bastion policy test FILE``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bastion.policy import load
from bastion.policy.testing import run_tests

ROOT = Path(__file__).resolve().parents[2]
OSO = ROOT / "examples" / "oso"
FILES = sorted(OSO.glob("*.polar"))

# The patterns of Oso's documentation that the directory must cover, each by its file.
PATTERNS = {
    "rbac",
    "custom_roles",
    "files_and_folders",
    "organization_hierarchies",
    "impersonation",
    "time_based_checks",
    "entitlements",
    "global_roles",
    "conditional_roles",
    "public_private",
}


def test_every_documented_pattern_has_an_example():
    assert {f.stem for f in FILES} >= PATTERNS


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_oso_example_passes_its_tests_with_the_cli(path):
    result = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "policy", "test", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout, result.stdout
    assert " error:" not in result.stderr, result.stderr


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_oso_example_assertions_all_run_and_pass(path):
    loaded = load([(path.name, path.read_text())])
    results = run_tests(loaded)
    assert results, "each example carries test blocks"
    for result in results:
        assert result.error is None, (result.name, result.error)
        assert result.assertions, result.name
        failed = [a.text for a in result.assertions if not a.passed]
        assert not failed, (result.name, failed)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_flipped_assertion_fails(path):
    """The examples' tests can fail: turning the first ``assert`` into ``assert_not`` does."""
    text = path.read_text()
    flipped = text.replace("  assert allow(", "  assert_not allow(", 1)
    assert flipped != text
    results = run_tests(load([(path.name, flipped)]))
    assert any(not r.passed for r in results)
