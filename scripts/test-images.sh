#!/usr/bin/env bash
# Builds the small local test image the integration tests run (no registry is needed):
#   switchboard-test/busybox:latest  busybox-static with sh, httpd, nc, sleep, hostname.
# Idempotent: does nothing when the image exists.
set -euo pipefail
IMAGE=switchboard-test/busybox:latest
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Prefer the host's busybox-static; otherwise fetch the package (no install needed).
bb=/bin/busybox
if [ ! -x "$bb" ] || ! file -L "$bb" 2>/dev/null | grep -q 'statically linked'; then
  (cd "$work" && apt-get download busybox-static >/dev/null && dpkg-deb -x busybox-static_*.deb deb)
  bb="$work/deb/bin/busybox"
fi
root="$work/root"
mkdir -p "$root/bin" "$root/www" "$root/tmp" "$root/etc"
cp "$bb" "$root/bin/busybox"
for app in sh httpd nc sleep hostname cat echo ls ps kill wget ip ifconfig env true false printf grep sed; do
  ln -sf busybox "$root/bin/$app"
done
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo ok > "$root/www/index.html"
tar -C "$root" -c . | docker import -c 'CMD ["/bin/sh"]' -c 'ENV PATH=/bin' - "$IMAGE" >/dev/null
echo "built $IMAGE"
