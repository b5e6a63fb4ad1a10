"""Triton kernels: ring-attention flash attention, SP reduce-scatter, MoE dispatch.

Each family lands with its issue (context, SP reduce-scatter, expert parallel); until then
``ParallelPlan(kernels=...)`` accepts the switch and the PyTorch paths run.
"""
