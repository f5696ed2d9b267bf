"""Triton kernels (import triton lazily: nothing here is imported by `import fastdistill`)."""
