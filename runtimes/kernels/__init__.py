"""sparsec's own CPU kernels: packed sparse (bitmask + non-zeros) and dense int8 / int4 Linear ops on torch.

csrc/       C++ kernels (portable, AVX2, AVX-512 VBMI2+VNNI; chosen at run time) and the torch op glue
build.py    builds the torch extension once per source change (`python -m runtimes.kernels.build`)
ops.py      loads it and wraps the torch.ops.sparsec.* operators
format.py   the packed weight format: packing, safetensors save/load (never densified on load)
modules.py  PackedLinearModule (the nn.Module calling the ops)
fuse.py     one packed op for q/k/v and gate/up (rows concatenated at load time)
pack.py     an artifact's planned layers -> ART/sparsec/ (the sparse-on-disk weights)
torch_host.py  whole HF models with those modules, loaded from an artifact
See docs/kernels.md.
"""
