"""Reward functions chosen by name in config (rule verifiers, format, judges, reward models)."""
