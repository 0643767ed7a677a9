"""Training: the data pipeline (`train.data`) and, alongside it, the optimiser, step and loop."""
