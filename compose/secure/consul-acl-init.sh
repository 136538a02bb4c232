#!/bin/sh
# One-shot ACL set-up for the secured Consul stack (docker-compose.secure.yml), run by the
# `acl-init` service before registrator and the load balancer start. Idempotent: a second
# `up` finds the tokens in the `secrets` volume and only checks that they still work.
#
#   management-token   from `consul acl bootstrap` (default-deny: nothing works without one)
#   registrator-token  service:write (every service name) + node:read
#   confd-token        service:read + node:read + key:read, and for automatic HTTPS
#                      key:write on switchboard/acme/ and session:write (the ordering lock)
#   the agent's token  node:write, so the server may keep its own node in the catalog
#
# All of them live in the `acl` volume, which only this service mounts; each consumer's own
# token is also copied to /out/<name>/token, a volume of its own that only that consumer
# mounts, so the internet-facing proxy never holds the registrator's or the management token.
# Secrets are written with umask 077 and never printed.
set -eu
umask 077
export CONSUL_HTTP_ADDR="${CONSUL_HTTP_ADDR:-http://consul:8500}"
dir=/secrets

log() { echo "acl-init: $*"; }

# Bootstrap once; wait (bounded) for the server to have a leader.
if [ ! -s "$dir/management-token" ]; then
  tries=0
  until out=$(consul acl bootstrap -format=json 2>&1); do
    case "$out" in
      *"no longer allowed"*)
        log "Consul's ACLs were bootstrapped already but $dir/management-token is missing: remove the stack's volumes (down -v) to start over" >&2
        exit 1 ;;
    esac
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || { log "Consul did not accept the ACL bootstrap after 60 tries: $out" >&2; exit 1; }
    sleep 1
  done
  echo "$out" | sed -n 's/.*"SecretID": *"\([^"]*\)".*/\1/p' > "$dir/management-token.new"
  [ -s "$dir/management-token.new" ] || { log "no SecretID in Consul's bootstrap answer" >&2; exit 1; }
  mv "$dir/management-token.new" "$dir/management-token"
  log "bootstrapped ACLs"
fi
export CONSUL_HTTP_TOKEN_FILE="$dir/management-token"

# policy NAME RULES: creates the policy, or sets these rules on the existing one (so a
# stack made with older rules gets the current ones at its next `up`).
policy() {
  id=$(consul acl policy read -name "$1" -format=json 2>/dev/null | sed -n 's/^ *"ID": *"\([^"]*\)".*/\1/p' | head -n 1)
  if [ -n "$id" ]; then
    consul acl policy update -id "$id" -rules "$2" >/dev/null
  else
    consul acl policy create -name "$1" -rules "$2" >/dev/null
  fi
}

# token NAME POLICY: a token with that policy, its secret in $dir/NAME-token.
token() {
  if [ -s "$dir/$1-token" ] && consul acl token read -self -token-file "$dir/$1-token" >/dev/null 2>&1; then
    return
  fi
  secret=$(cat /proc/sys/kernel/random/uuid)
  consul acl token create -description "$1" -policy-name "$2" -secret "$secret" >/dev/null
  printf '%s\n' "$secret" > "$dir/$1-token.new"
  mv "$dir/$1-token.new" "$dir/$1-token"
  log "created the $1 token"
}

policy registrator 'service_prefix "" { policy = "write" } node_prefix "" { policy = "read" }'
policy confd 'service_prefix "" { policy = "read" } node_prefix "" { policy = "read" } key_prefix "" { policy = "read" } key_prefix "switchboard/acme/" { policy = "write" } session_prefix "" { policy = "write" }'
policy agent 'node_prefix "" { policy = "write" } service_prefix "" { policy = "read" }'
token registrator registrator
token confd confd
token agent agent
for name in registrator confd; do
  if [ -d "/out/$name" ]; then
    cp "$dir/$name-token" "/out/$name/token.new"
    mv "/out/$name/token.new" "/out/$name/token"
  fi
done
consul acl set-agent-token agent "$(cat "$dir/agent-token")" >/dev/null
log "ready"
