#!/bin/sh
# Writes the page once (this instance's name and address), then serves it with busybox httpd.
set -eu
mkdir -p /www
echo "Hello from $(/bin/busybox hostname) ($(/bin/busybox hostname -i))" >/www/index.html
/bin/busybox httpd -f -p 80 -h /www &
# httpd ignores SIGTERM as PID 1's child here; the shell exits on it instead, which ends the
# container at once rather than after docker stop's 10 s grace period.
trap 'exit 0' TERM INT
wait
