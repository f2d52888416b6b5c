// Stand-in for NVIDIA's header under CUDA emulation: see cuda_runtime.h.
#include "cuda_runtime.h"
