// Placeholder until the CUDA handlers land (see cuda_kernels.cu).
