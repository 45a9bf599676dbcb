"""Decode wing: token-by-token generation of a lowered causal LM with its KV cache.

`loop` is the one generation loop (stdlib + numpy: it also runs inside the DeepSparse worker),
`decoders` the in-process decoders and `open_decoder`, `static_graph` the fixed-shape graphs, `deepsparse_decoder`
the DeepSparse worker's decoder, `traffic` the weight bytes a token reads, `reference` the torch greedy
reference. Import the submodules; this package imports nothing."""
