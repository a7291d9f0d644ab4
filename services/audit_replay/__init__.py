"""The audit trail: reading the event history back, replaying runs and rebuilding projections."""
