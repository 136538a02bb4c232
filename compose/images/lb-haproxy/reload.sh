#!/bin/sh
# confd's reload command: makes the HAProxy master re-read its config (SIGUSR2, master-worker
# mode), or starts HAProxy when it is not running yet (the entrypoint's first render happens
# before HAProxy can start: there is no config before it).
set -eu
pid=$(cat /run/haproxy.pid 2>/dev/null || true)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  kill -USR2 "$pid"
  exit 0
fi
# (The pid file is named in the rendered config: vars.pid, default /run/haproxy.pid.)
exec haproxy -W -D -f /etc/haproxy/haproxy.cfg
