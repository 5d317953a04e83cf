"""Triton kernels, each beside its torch reference and CPU path. Imports nothing of ours."""
