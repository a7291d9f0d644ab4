"""``python -m services.audit_replay``: run the audit-replay service."""

from services.audit_replay.bootstrap import main

main()
