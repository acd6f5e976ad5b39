"""The audit trail: an append-only table of events that explain who did what, and why."""

from bastion.audit.log import AuditEvent, AuditLog

__all__ = ["AuditEvent", "AuditLog"]
