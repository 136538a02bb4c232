#!/bin/sh
# confd's reload command: makes the HAProxy master re-read its config (SIGUSR2, master-worker
# mode), or starts HAProxy when it is not running yet (the entrypoint's first render happens
# before HAProxy can start: there is no config before it).
set -eu
# Whether a process named $1 runs (no procps in the image: read /proc).
running() {
  for c in /proc/[0-9]*/comm; do
    [ "$(cat "$c" 2>/dev/null)" = "$1" ] && return 0
  done
  return 1
}
# The master truncates and rewrites its pid file at every reload: an empty file while HAProxy
# runs is a reload in progress, waited out (5 s at most), never a reason to start a second one.
pid=
for _ in $(seq 50); do
  pid=$(cat /run/haproxy.pid 2>/dev/null || true)
  [ -n "$pid" ] && break
  running haproxy || break
  sleep 0.1
done
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  kill -USR2 "$pid"
  exit 0
fi
if running haproxy; then
  echo "lb-reload: HAProxy runs but /run/haproxy.pid names no live process" >&2
  exit 1
fi
# (The pid file is named in the rendered config: vars.pid, default /run/haproxy.pid.)
exec haproxy -W -D -f /etc/haproxy/haproxy.cfg
