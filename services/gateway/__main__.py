"""``python -m services.gateway``: run the gateway service."""

from services.gateway.bootstrap import main

main()
