"""Delegation between agents (docs/delegation.md)."""
