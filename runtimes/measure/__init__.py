"""Measure wing: verification against the dense model, benchmarks, decode measurement, memory bandwidth,
and the dense reference cache they compare against. Import the submodules; this package imports nothing."""
