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
# The worker processes (every haproxy but the master), one PID per line.
workers() {
  for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = haproxy ] && [ "${d#/proc/}" != "$1" ] && echo "${d#/proc/}"
  done
}
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  before=" $(workers "$pid" | tr '\n' ' ') "
  kill -USR2 "$pid"
  # A SIGUSR2 that reaches the master while it is still re-executing for the previous one is
  # lost, and HAProxy would stay on the older file. Return only once this reload has forked
  # its new worker (and a moment more for the master to settle), so confd's next reload never
  # overlaps it. 10 s at most.
  for _ in $(seq 100); do
    for w in $(workers "$pid"); do
      case "$before" in
        *" $w "*) ;;
        *) sleep 0.2; exit 0 ;;
      esac
    done
    sleep 0.1
  done
  echo "lb-reload: no new HAProxy worker 10 s after SIGUSR2" >&2
  exit 1
fi
if running haproxy; then
  echo "lb-reload: HAProxy runs but /run/haproxy.pid names no live process" >&2
  exit 1
fi
# (The pid file is named in the rendered config: vars.pid, default /run/haproxy.pid.)
haproxy -W -D -f /etc/haproxy/haproxy.cfg
# The master handles SIGUSR2 once it runs its worker; a reload that came before (confd's
# next change, a second after this first start) would end it. Return only once the worker
# runs, so every later reload finds the master ready (10 s at most).
for _ in $(seq 100); do
  n=0
  for c in /proc/[0-9]*/comm; do
    [ "$(cat "$c" 2>/dev/null)" = haproxy ] && n=$((n + 1))
  done
  [ "$n" -ge 2 ] && exit 0
  sleep 0.1
done
echo "lb-reload: HAProxy started, but no worker runs after 10 s" >&2
exit 1
