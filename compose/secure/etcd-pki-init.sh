#!/bin/sh
# One-shot PKI for the secured etcd stack (docker-compose.etcd-haproxy.secure.yml), run by
# the `pki-init` service before etcd starts. It uses Consul's built-in `consul tls` commands
# (the consul image has them) to make a private CA and etcd's server certificate, valid for
# the names `etcd` and `localhost` and 127.0.0.1. Idempotent: existing files are kept.
#
#   /pki (only this service)   the CA's certificate and private key
#   /tls (etcd)                ca.pem, server.pem, server-key.pem
#   /ca  (the clients)         ca.pem: the clients trust this CA only
set -eu
umask 077
cd /pki
if [ ! -s ca-key.pem ]; then
  consul tls ca create -days 3650 >/dev/null
  mv consul-agent-ca.pem ca.pem
  mv consul-agent-ca-key.pem ca-key.pem
  echo "pki-init: made a CA"
fi
if [ ! -s /tls/server.pem ]; then
  rm -f dc1-server-consul-*.pem
  consul tls cert create -server -days 825 -ca ca.pem -key ca-key.pem \
    -additional-dnsname etcd >/dev/null
  mv dc1-server-consul-0-key.pem /tls/server-key.pem
  mv dc1-server-consul-0.pem /tls/server.pem
  cp ca.pem /tls/ca.pem
  echo "pki-init: made etcd's server certificate"
fi
cp ca.pem /ca/ca.pem.new
chmod 0644 /ca/ca.pem.new
mv /ca/ca.pem.new /ca/ca.pem
