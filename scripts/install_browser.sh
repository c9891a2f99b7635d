#!/usr/bin/env bash
# Install headless Chromium and fonts (Chinese, emoji) from Debian for the browser tests.
# Does nothing when they are already installed.
set -euo pipefail
packages=(chromium fonts-noto-cjk fonts-noto-color-emoji)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]} == 0)); then
  echo "browser: chromium and fonts are installed"
  exit 0
fi
sudo=""
[[ $(id -u) -ne 0 ]] && sudo=sudo
echo "browser: installing ${missing[*]} from Debian (about 150 MB)"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
