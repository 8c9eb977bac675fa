"""ptuning: P-tuning (continuous prompts, Liu et al. 2021) on the LAMA knowledge probe.

The trainer talks to language models only through the Backbone seam (backbone.py); see docs/ARCHITECTURE.md.
"""
