"""`sparsec sweep`: a grid of compiles + evaluations + verifications run as Ray tasks (docs/sweep.md).

grid (the axes and shared settings, validated before Ray starts), store (one result JSON per cell,
written atomically: what makes a sweep resumable), tasks (one cell's work: `compile_model`),
runner (Ray: local instance or `--address`), table (results.csv, markdown, the best configuration
under a quality budget), pareto (the quality-vs-speedup front and its plot).
"""
