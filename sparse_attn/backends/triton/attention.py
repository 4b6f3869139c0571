"""Block-sparse flash attention (forward and backward) in Triton over the shared BlockLayout."""
