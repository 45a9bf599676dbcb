"""The lowered graph's format bounds, in one place (torch-free: runtimes that rewrite graphs read them too)."""

OPSET = 17  # declared default-domain opset of every lowered graph (compiler/lowering/export.py says why 17)
MAX_IR_VERSION = 9  # DeepSparse loads ONNX IR <= 9: every lowered file keeps to it
