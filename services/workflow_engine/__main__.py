"""``python -m services.workflow_engine``: run the workflow-engine service."""

from services.workflow_engine.bootstrap import main

main()
