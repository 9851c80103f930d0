"""The ``onnxopt`` command line (click)."""
