"""``python -m services.cost``: run the cost service."""

from services.cost.bootstrap import main

main()
