#!/bin/sh
# The demo app: every request to / (GET) or /cgi-bin/slow (GET or POST, answered after
# SLOW_SECONDS, default 0.3) gets "Hello from <hostname> (<ip>)", served by busybox httpd.
#
# It stops as real servers do: on SIGTERM (docker stop) it keeps serving for GRACE_SECONDS
# (default 2) so requests already on their way are answered, then exits. A load balancer
# that takes it out at the stop signal thus loses nothing.
set -eu
mkdir -p /www/cgi-bin
hello="Hello from $(/bin/busybox hostname) ($(/bin/busybox hostname -i))"
echo "$hello" >/www/index.html
cat >/www/cgi-bin/slow <<CGI
#!/bin/sh
# Read the request body (if any) before answering, as an application would.
[ -n "\${CONTENT_LENGTH:-}" ] && /bin/busybox head -c "\$CONTENT_LENGTH" >/dev/null
/bin/busybox sleep ${SLOW_SECONDS:-0.3}
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$hello"
CGI
chmod 755 /www/cgi-bin/slow
/bin/busybox httpd -f -p 80 -h /www &
httpd=$!
# httpd ignores SIGTERM as PID 1's child here; the shell handles it: serve on through the
# grace period, then stop httpd and exit (well before docker stop's 10 s limit).
stop() {
  /bin/busybox sleep "${GRACE_SECONDS:-2}"
  kill "$httpd" 2>/dev/null || true
  exit 0
}
trap stop TERM INT
wait
