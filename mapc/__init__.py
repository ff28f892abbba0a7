"""mapc: a protection compiler for trained classifiers (MAP, mask pruning).

The trained weights stay frozen; mapc learns a binary mask that prunes the
parameters unauthorized domains rely on and compiles it into an ONNX artifact.
"""
__version__ = "0.1.0"
