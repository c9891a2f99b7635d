"""Running a model on CPU: threads, loader, INT8 cache and quantizer."""
