"""Live signals: the Shared Signals (SSF/CAEP/RISC) receiver, posture and behaviour signals.

The entry module for the SSF receiver is `bastion.signals.ssf`; behaviour counters and
baselines are `bastion.signals.behavior`, shadow (monitor-only) rules `bastion.signals.shadow`.
"""
