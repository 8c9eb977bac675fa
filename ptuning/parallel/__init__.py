"""Ranks and groups, packs of units, what fits on a device, and the prompt bank."""
