"""Folds of event streams that more than one service reads."""
