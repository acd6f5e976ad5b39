"""Live signals: live facts about users, devices, agents and sessions (the signals API, the
Shared Signals SSF/CAEP/RISC receiver), request posture, freshness; and the adaptive responses
to them: the read-only downgrade, the kill switch, step-up on risk.

Entry modules: `bastion.signals.ssf` (the receiver), `bastion.signals.store` (signals set through
the API), `bastion.signals.posture` (the request's posture in the gateway's context),
`bastion.signals.behavior` (behaviour counters and baselines), `bastion.signals.shadow`
(shadow, monitor-only, rules), `bastion.signals.read_only`, `bastion.signals.suspensions` (the
kill switch), `bastion.signals.step_up` (``requires_recent_auth``) and `bastion.signals.alerts`
(alerts, escalation and acknowledgement).
"""
