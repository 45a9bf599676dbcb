"""Lowering wing: a compiled ModelIR → files (ONNX graph, int8 variants, feeds), nothing else.

`lower` drives it; `export` is the torch → ONNX step, `rules` the checks a lowered graph must pass,
`quant` the int8 forms, `feeds` the graph inputs built from token ids (numpy only: the server and the
measurements use it without torch). Import the submodules; this package imports nothing."""
