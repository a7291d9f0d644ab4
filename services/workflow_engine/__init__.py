"""Agent runs and their steps: the run lifecycle and the decision to stop a run on a denied step."""
