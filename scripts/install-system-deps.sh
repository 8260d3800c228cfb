#!/bin/sh
# Installs the real servers (and the browser) the test suite drives (Debian packages), only when missing.
# The packages' own system services are stopped: tests start private instances
# on ephemeral loopback ports and must never touch the system ones.
set -eu
need=""
command -v apache2 >/dev/null 2>&1 || [ -x /usr/sbin/apache2 ] || need="$need apache2"
[ -x /usr/sbin/haproxy ] || need="$need haproxy"
[ -x /usr/sbin/nginx ] || need="$need nginx"
[ -x /usr/sbin/sshd ] || need="$need openssh-server"
command -v wrk >/dev/null 2>&1 || need="$need wrk"
# The desk's browser test drives Debian's Chromium with Playwright (no browser download).
[ -x /usr/bin/chromium ] || need="$need chromium"
# The bake analysis tests scrape the balancers with a real Prometheus.
[ -x /usr/bin/prometheus ] || need="$need prometheus"
# The PostgreSQL tests run initdb as another user with runuser.
command -v runuser >/dev/null 2>&1 || need="$need util-linux"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need="$need postgresql"
if [ -n "$need" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages:$need (run as root, or install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends $need
fi
exit 0
