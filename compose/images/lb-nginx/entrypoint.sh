#!/bin/sh
# Renders nginx.conf once from the registry, starts nginx on it, then runs confd as the main
# process to keep it current: `docker stop` stops confd, and the container (nginx with it).
# Arguments are passed to confd.
set -eu
# A pid file left by a previous run of this container would point at some other process, and
# a unix socket left by it would keep nginx from listening on that path again.
rm -f /run/nginx.pid /run/nginx-peers.sock
set -- --config /etc/confd/confd.yaml "$@"
# The registry may still be starting (compose starts everything at once): retry a few times.
tries=0
until confd "$@" --once; do
  tries=$((tries + 1))
  if [ "$tries" -ge 10 ]; then
    echo "lb: no config rendered after $tries attempts" >&2
    exit 1
  fi
  sleep 2
done
# Start nginx (the first render usually did, through the reload command; not when the
# rendered file was already in place, e.g. after `docker restart`).
# Only when it is not running: a second reload right after the first start is needless, and
# HAProxy's master can lose a reload signal that overlaps another.
running() {
  for c in /proc/[0-9]*/comm; do
    [ "$(cat "$c" 2>/dev/null)" = "$1" ] && return 0
  done
  return 1
}
running nginx || /usr/local/bin/lb-reload
exec confd "$@"
