"""Reinforcement learning: rollout orchestration, advantages, GSPO losses, progressive hints, the iteration schedule."""
