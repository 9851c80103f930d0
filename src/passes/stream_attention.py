"""stream-attention: causal self-attention keeps past keys and values in caches."""
