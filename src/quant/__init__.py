"""Weight numerics with no graph in them: RTN, k-quant, int8, and the packing layouts.

- :mod:`onnxopt.quant.blocks`: the ``Blockwise`` layout, round-to-nearest, int8 per channel,
  and the chunked, threaded driver every block kernel runs under.
- :mod:`onnxopt.quant.kquant`: importance-weighted search of scale and zero point per block.
- :mod:`onnxopt.quant.packing`: MatMulNBits and INT4/UINT4 DequantizeLinear byte layouts.
"""
