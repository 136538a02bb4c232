#!/bin/sh
# One-shot etcd authentication set-up for the secured etcd stack, run by the `auth-init`
# service once etcd answers over TLS, before registrator and the load balancer start.
#
#   root          etcd's administrator; its password stays in the `etcd-auth` volume
#   registrator   role registrator: readwrite on the prefix /services/
#   confd         role confd: read on the prefix /services/ (cannot register anything),
#                 readwrite on switchboard/acme/ (automatic HTTPS: certificates and the lock)
#                 and read on switchboard/certs/ (certificates an operator puts in the store)
#
# Each consumer's password is copied to /out/<name>/password, a volume only that consumer
# mounts. Passwords are random, written with umask 077, never printed. Idempotent: once auth
# is on, a second `up` only checks that the root password still works.
set -eu
umask 077
dir=/secrets
ctl() { etcdctl --endpoints="${ETCD_ENDPOINT:-https://etcd:2379}" --cacert=/ca/ca.pem "$@"; }
password() { tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32; }
log() { echo "auth-init: $*"; }

tries=0
until ctl endpoint health >/dev/null 2>&1 || ctl --user "root:$(cat "$dir/root-password" 2>/dev/null)" endpoint health >/dev/null 2>&1; do
  tries=$((tries + 1))
  [ "$tries" -lt 60 ] || { log "etcd did not answer over TLS after 60 tries" >&2; exit 1; }
  sleep 1
done

if ! ctl user list >/dev/null 2>&1; then
  # Refused without credentials: auth is on already.
  ctl --user "root:$(cat "$dir/root-password" 2>/dev/null)" user list >/dev/null 2>&1 || {
    log "etcd's auth is on but the root password in the etcd-auth volume does not work: remove the stack's volumes (down -v) to start over" >&2
    exit 1
  }
  log "auth already on"
  # The grants are set again, so that a stack whose confd role lacks one gets it.
  ctl --user "root:$(cat "$dir/root-password")" role grant-permission confd --prefix=true readwrite switchboard/acme/ >/dev/null
  ctl --user "root:$(cat "$dir/root-password")" role grant-permission confd --prefix=true read switchboard/certs/ >/dev/null
else
  for name in root registrator confd; do
    [ -s "$dir/$name-password" ] || { password > "$dir/$name-password.new" && mv "$dir/$name-password.new" "$dir/$name-password"; }
  done
  # Before `auth enable` every request is allowed; re-running after a failure is safe. The
  # passwords go on etcdctl's command line, seen only inside this short-lived container.
  ctl user get root >/dev/null 2>&1 || ctl user add root --new-user-password="$(cat "$dir/root-password")" --interactive=false >/dev/null
  ctl role get root >/dev/null 2>&1 || ctl role add root >/dev/null
  ctl user grant-role root root >/dev/null
  ctl role get registrator >/dev/null 2>&1 || ctl role add registrator >/dev/null
  ctl role grant-permission registrator --prefix=true readwrite /services/ >/dev/null
  ctl role get confd >/dev/null 2>&1 || ctl role add confd >/dev/null
  ctl role grant-permission confd --prefix=true read /services/ >/dev/null
  ctl role grant-permission confd --prefix=true readwrite switchboard/acme/ >/dev/null
  ctl role grant-permission confd --prefix=true read switchboard/certs/ >/dev/null
  for name in registrator confd; do
    ctl user get "$name" >/dev/null 2>&1 || ctl user add "$name" --new-user-password="$(cat "$dir/$name-password")" --interactive=false >/dev/null
    ctl user grant-role "$name" "$name" >/dev/null
  done
  ctl auth enable >/dev/null
  log "auth enabled; users registrator and confd made"
fi
for name in registrator confd; do
  if [ -d "/out/$name" ]; then
    cp "$dir/$name-password" "/out/$name/password.new"
    mv "/out/$name/password.new" "/out/$name/password"
  fi
done
log "ready"
