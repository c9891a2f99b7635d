"""The neural-speed runtime: ITREX's own CPU runtime, its INT8 graph file, KV cache slots and batcher."""
