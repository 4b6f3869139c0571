// Split-KV decode kernel for CPU (placeholder until the kernel lands).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
