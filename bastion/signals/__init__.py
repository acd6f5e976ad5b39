"""Signals: live facts about users, devices, agents and sessions, request posture, freshness."""
