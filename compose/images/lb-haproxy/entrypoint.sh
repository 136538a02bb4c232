#!/bin/sh
# Renders haproxy.cfg once from the registry, starts HAProxy (master-worker) on it, then runs
# confd as the main process to keep it current: `docker stop` stops confd, and the container
# (HAProxy with it). Arguments are passed to confd. STATS_USER and STATS_PASSWORD protect
# the statistics page; they reach the template as confd vars, which it quotes for HAProxy.
# Without STATS_PASSWORD there is no statistics page at all (never an open one): compose
# commands other than `up` (scale, down, logs) need not repeat the password.
set -eu
STATS_USER=${STATS_USER:-admin}
STATS_PASSWORD=${STATS_PASSWORD:-}
no_stats=
if [ -z "$STATS_PASSWORD" ]; then
  echo "lb: STATS_PASSWORD is not set: no statistics page" >&2
  no_stats="--var stats_port="
fi
# A pid file left by a previous run of this container would point at some other process.
rm -f /run/haproxy.pid
# The admin socket's directory (confd.yaml: vars.stats_socket and live.haproxy_socket).
mkdir -p /run/haproxy
# shellcheck disable=SC2086 # $no_stats is two words or none
set -- --config /etc/confd/confd.yaml --var "stats_user=$STATS_USER" \
  --var "stats_password=$STATS_PASSWORD" $no_stats "$@"
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
# Start HAProxy (the first render usually did, through the reload command; not when the
# rendered file was already in place, e.g. after `docker restart`).
# Only when it is not running: a second reload right after the first start is needless, and
# HAProxy's master can lose a reload signal that overlaps another.
running() {
  for c in /proc/[0-9]*/comm; do
    [ "$(cat "$c" 2>/dev/null)" = "$1" ] && return 0
  done
  return 1
}
running haproxy || /usr/local/bin/lb-reload
exec confd "$@"
