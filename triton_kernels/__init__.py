"""FP8 training kernels (Triton) beside their torch references. Importing this package does not import triton."""
