"""Live signals and adaptive responses (issue 11): read-only downgrade, kill switch, step-up."""
