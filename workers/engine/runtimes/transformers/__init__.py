"""The transformers runtime: fp32/bf16 baselines, and the serving path the qbits runtime reuses."""
