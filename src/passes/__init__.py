"""Built-in passes, one per module; each registers itself when imported (see onnxopt.registry)."""
