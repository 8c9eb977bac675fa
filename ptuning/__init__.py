"""ptuning: P-tuning (continuous prompts, Liu et al. 2021) on the LAMA knowledge probe.

The trainer talks to language models only through the Backbone seam (backbone.py); see docs/ARCHITECTURE.md.
"""
import os

# MKL's float32 GEMM otherwise picks its blocking by thread count and batch size on some CPUs (measured on an AMD
# EPYC: a product of one unit at 2 threads differs in the last bit from the same product inside a stack of 8), so a
# unit's floats would depend on its pack. Strict CNR mode makes GEMM bitwise the same across both. MKL reads this at
# its first call, so it holds wherever ptuning is imported before any matmul runs; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
