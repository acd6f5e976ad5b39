"""Live signals: behaviour counters and baselines, shadow mode (docs/signals.md)."""
