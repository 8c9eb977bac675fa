"""Ranks and their groups (replicas, tensor-parallel groups), and the packs of units each replica trains."""
