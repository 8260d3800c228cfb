#!/bin/sh
# Debian's python3 ships venv separately; install it when `python3 -m venv` fails.
set -eu
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q python3-venv python3-dev
else
  echo "python3 -m venv failed: install your distribution's python3-venv package" >&2
  exit 1
fi
