"""The public HTTP API: tenants, run and step ingestion, and the read endpoints users call."""
