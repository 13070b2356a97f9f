//! cuBLAS of the virtual device (written from NVIDIA's cuBLAS documentation).
