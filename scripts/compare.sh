#!/usr/bin/env bash
# Ask every served model the questions in conf/questions/ and write a side-by-side report.
# Usage: scripts/compare.sh [--profile default] ...   (--help lists the options)
source "$(dirname "$0")/lib.sh"
exec "$bin/bundle-compare" "$@"
