"""The training loop, a unit's run, the packed forward and evaluation, checkpoints, precision, stops."""
