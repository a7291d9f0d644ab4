"""``python -m services.incident``: run the incident service."""

from services.incident.bootstrap import main

main()
