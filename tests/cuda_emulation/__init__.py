"""Host emulation of the CUDA kernels, for tests on machines without a GPU."""
