"""Serve wing: the HTTP server (`app`), dynamic batching, text handling, metrics, the OpenAI schema, the
served model, and the deploy bundle (`package`). Import the submodules; this package imports nothing
(`sparsec serve` of an ONNX artifact must start without torch)."""
