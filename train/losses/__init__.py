"""Training losses as pure functions over arrays (cross-entropy, preference losses)."""
