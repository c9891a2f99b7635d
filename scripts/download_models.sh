#!/usr/bin/env bash
# Download a profile's ModelScope models (resumable, with progress) and check they are complete.
# Usage: scripts/download_models.sh [--profile seed] [--cache-dir DIR]
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle" download "$@"
