"""Kernels shared by several hardware plugins (the core itself never imports them).

:mod:`tokenmill.kernels.triton` holds the portable Triton kernels that the CUDA, ROCm and
XPU plugins register for their platform names: one copy, three platforms. Importing this
package is free: nothing here imports Triton until a kernel is first launched.
"""
