"""The qbits runtime: ITREX weight-only INT8 (RtnConfig) under the transformers model."""
