#!/bin/sh
# Renders haproxy.cfg once from the registry, starts HAProxy (master-worker) on it, then runs
# confd as the main process to keep it current: `docker stop` stops confd, and the container
# (HAProxy with it). Arguments are passed to confd. STATS_USER and STATS_PASSWORD protect
# the statistics page; they reach the template as confd vars, which it quotes for HAProxy.
set -eu
: "${STATS_USER:?set STATS_USER for the HAProxy statistics page}"
: "${STATS_PASSWORD:?set STATS_PASSWORD for the HAProxy statistics page}"
# A pid file left by a previous run of this container would point at some other process.
rm -f /run/haproxy.pid
# The admin socket's directory (confd.yaml: vars.stats_socket and live.haproxy_socket).
mkdir -p /run/haproxy
set -- --config /etc/confd/confd.yaml --var "stats_user=$STATS_USER" \
  --var "stats_password=$STATS_PASSWORD" "$@"
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
/usr/local/bin/lb-reload
exec confd "$@"
