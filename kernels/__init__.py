"""Triton kernels for CUDA tensors, installed as pyfused.kernels.

Importing this package imports triton; pyfused imports it only when a step needs it.
"""
