"""MegatronLM-11B: the fairseq release read without fairseq, merged or tensor-parallel (see issue: Megatron-11B).

Empty until that work lands; the package exists so the distribution's layout is stable.
"""
