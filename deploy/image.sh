#!/usr/bin/env bash
# Builds the image expertmesh:local from this checkout without pulling anything (no registry
# is needed): the release binary, the shared libraries it links (read off `ldd`), a passwd
# entry for the non-root user, the bundled tiny checkpoints, and a Dockerfile FROM scratch.
# Nothing else is in the image: no shell, no package manager.
#
#   deploy/image.sh                          # cargo build --release, then docker build
#   EXPERTMESH_PROFILE=debug deploy/image.sh # the debug binary
#   EXPERTMESH_BINARY=path deploy/image.sh   # a binary built already (what the tests do)
#   EXPERTMESH_IMAGE=expertmesh:dev deploy/image.sh
#
# Rebuilding is incremental: cargo rebuilds only what changed, and docker reuses its layers
# (the libraries and models first, the binary last).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${EXPERTMESH_PROFILE:-release}
image=${EXPERTMESH_IMAGE:-expertmesh:local}
# EXPERTMESH_BINARY: a binary built already (the tests pass theirs), instead of building one.
binary=${EXPERTMESH_BINARY:-}
if [ -z "$binary" ]; then
    case "$profile" in
    release) cargo build --release -p expertmesh ;;
    debug) cargo build -p expertmesh ;;
    *) echo "EXPERTMESH_PROFILE is release or debug, not $profile" >&2; exit 2 ;;
    esac
    binary=target/$profile/expertmesh
fi
context=target/image
rootfs=$context/rootfs
rm -rf "$context"
mkdir -p "$rootfs"/{usr/local/bin,etc,opt/expertmesh/models} "$context"/owned/{tmp,tls,var/lib/expertmesh}
# The dynamic loader and every library the binary links, at the paths ldd names.
ldd "$binary" | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
# Debug information stays on the build machine.
mkdir -p "$context/bin"
objcopy --strip-debug "$binary" "$context/bin/expertmesh"
printf 'root:x:0:0:root:/:/nonexistent\nexpertmesh:x:10001:10001:expertmesh:/var/lib/expertmesh:/nonexistent\n' \
    > "$rootfs/etc/passwd"
printf 'root:x:0:\nexpertmesh:x:10001:\n' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
cp -r models/expertmesh-demo tests/fixtures/tiny-maverick tests/fixtures/tiny-scout "$rootfs/opt/expertmesh/models/"
# Readable by the image's user whatever the checkout's modes are.
chmod -R a+rX "$rootfs/opt/expertmesh/models"
cp deploy/image/Dockerfile "$context/Dockerfile"
docker build -q -t "$image" "$context"
echo "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
