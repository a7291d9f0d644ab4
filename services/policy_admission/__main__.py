"""``python -m services.policy_admission``: run the policy-admission service."""

from services.policy_admission.bootstrap import main

main()
