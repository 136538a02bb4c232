#!/bin/sh
# confd's reload command: reloads nginx, or starts it when it is not running yet (the
# entrypoint's first render happens before nginx can start: there is no config before it).
set -eu
pid=$(cat /run/nginx.pid 2>/dev/null || true)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  exec nginx -s reload
fi
# A socket file left by an nginx that died would keep it from listening on that path again.
rm -f /run/nginx-peers.sock
# nginx daemonizes; its inherited stdout/stderr would keep confd's output capture of this
# command open (confd waits for them to close), so give it the container's own (PID 1's),
# which is where docker logs reads and where nginx's /dev/stderr error log belongs anyway.
exec nginx </dev/null >/proc/1/fd/1 2>/proc/1/fd/2
