"""Split-KV decode on the CPU (csrc/cpu/decode.cpp)."""
