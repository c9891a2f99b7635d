"""The llama.cpp runtime: GGUF Q8_0 weights from llama.cpp's converter, decoded by the prebuilt xllamacpp library."""
