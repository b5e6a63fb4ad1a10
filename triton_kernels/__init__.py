"""Triton kernels: ring-attention flash attention, SP reduce-scatter, MoE dispatch (each
behind its ``ParallelPlan(kernels=...)`` family), and two that compute exactly what their
torch forms do, so they run wherever CUDA is, with no switch: the eager cross entropy
(``cross_entropy.py``) and AdamW's update (``adamw.py``, ``dtensor_parallel.AdamW``).
"""
