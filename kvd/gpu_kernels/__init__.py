"""gpu_kernels."""
