"""Weight numerics with no graph in them: RTN, k-quant, int8, and the packing layouts."""
