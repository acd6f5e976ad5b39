"""Live signals: live facts about users, devices, agents and sessions (the signals API, the
Shared Signals SSF/CAEP/RISC receiver), request posture, freshness.

Entry modules: `bastion.signals.ssf` (the receiver), `bastion.signals.store` (signals set through
the API), `bastion.signals.posture` (the request's posture in the gateway's context),
`bastion.signals.behavior` (behaviour counters and baselines) and `bastion.signals.shadow`
(shadow, monitor-only, rules).
"""
