"""Tools run beside the bundle: compare with question sets and checks, benchmarks. Nothing in workers imports tools."""
