"""Admission before every step: the active policy bundle per tenant and every decision it makes."""
