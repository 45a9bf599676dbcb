"""Pure math behind the sparsity passes: scores, masks, allocations (OWL, AlphaPruning), SparseGPT.

Nothing here touches a ModelIR, a module or calibration plumbing: every function takes tensors or
plain numbers and returns new ones, so each is testable alone. Weight matrices are (out, in) and
N:M groups run along the input (reduction) axis, as everywhere in sparsec.
"""
