"""Benchmark generation (GenEval / DPG-Bench / flat layouts) and FID."""
