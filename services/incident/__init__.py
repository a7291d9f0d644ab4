"""Incidents opened from policy violations, and their acknowledgement and resolution."""
