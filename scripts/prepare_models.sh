#!/usr/bin/env bash
# Everything a start does before it starts a program: model folders, environments, INT8 weights (quantized once).
# Usage: scripts/prepare_models.sh [--profile default] [--host NAME]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle" prepare "$@"
