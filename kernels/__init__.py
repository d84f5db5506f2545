"""Triton kernels of ssiu and their launchers (installed as `ssiu.kernels`).

Import only as `ssiu.kernels`. Kernels know nothing of the model: they take tensors and
sizes. Every kernel config a launcher can pick is listed in `registry.KERNEL_SPECS`, so
that `ssiu check-kernels` can compile each one ahead of time for sm_90 and sm_80.
"""
