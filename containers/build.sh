#!/usr/bin/env bash
# Build one sparsek image (containers/Dockerfile) with whichever builder the host has:
# docker (with a running daemon), podman or buildah ($SPARSEK_BUILDER picks one).
#
#   containers/build.sh [OPTIONS] TARGET [-- BUILDER-ARGS ...]     TARGET: prod|bench|dev|ci
#
# Options:
#   --tag NAME        the image's name (default: sparsek:TARGET)
#   --base IMAGE      the base image (default: the Dockerfile's, ubuntu:24.04)
#   --local-base      build on localhost/sparsek-base:noble, which containers/base-rootfs.sh
#                     makes from a package mirror (hosts that reach no container registry)
#   --wheels DIR      pip may take wheels from DIR (linked into containers/local/wheels for
#                     the build, never into an image); for dev/ci the CPU torch then comes
#                     from DIR instead of PyTorch's CPU index
#   --ca-cert FILE    the CA bundle pip trusts during the build (hosts behind a TLS-inspecting
#                     proxy; for instance /etc/ssl/certs/ca-certificates.crt)
#   --run             run the image's command after building it (ci: the tests again)
# BUILDER-ARGS go to the builder as they are (e.g. --build-arg TORCH=torch==2.14.1).
# Prints the builder, the build time and the image's size.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
# shellcheck source=containers/lib.sh
. "$HERE/lib.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

TARGET="" TAG="" BASE="" WHEELS="" CA_CERT="" RUN=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG="$2"; shift 2 ;;
    --base) BASE="$2"; shift 2 ;;
    --local-base) BASE="localhost/sparsek-base:noble"; shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --ca-cert) CA_CERT="$2"; shift 2 ;;
    --run) RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) usage ;;
    prod | bench | dev | ci) TARGET="$1"; shift ;;
    *) echo "build.sh: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$TARGET" ] || usage
TAG="${TAG:-sparsek:$TARGET}"
BUILDER="$(sparsek_builder)" || {
  echo "build.sh: no image builder found (install docker, podman or buildah)" >&2
  exit 1
}

# The build's local inputs (containers/local/, mounted only while pip runs). One build of this
# checkout at a time: another would replace or delete them mid-build.
LOCAL="$HERE/local"
exec 9>"$LOCAL/.build.lock"
if ! flock -n 9; then
  echo "== waiting for the other containers/build.sh of this checkout to finish"
  flock 9
fi
rm -rf "$LOCAL/wheels" "$LOCAL/ca.pem"
ARGS=(-f "$HERE/Dockerfile" --target "$TARGET" -t "$TAG")
[ -z "$BASE" ] || ARGS+=(--build-arg "BASE=$BASE")
if [ -n "$WHEELS" ]; then
  mkdir -p "$LOCAL/wheels"
  for whl in "$WHEELS"/*.whl; do
    [ -e "$whl" ] || { echo "build.sh: no wheels in $WHEELS" >&2; exit 1; }
    ln "$whl" "$LOCAL/wheels/" 2>/dev/null || cp "$whl" "$LOCAL/wheels/"
  done
  ARGS+=(--build-arg "TORCH_CPU_INDEX=")
fi
[ -z "$CA_CERT" ] || cp "$CA_CERT" "$LOCAL/ca.pem"
trap 'rm -rf "$LOCAL/wheels" "$LOCAL/ca.pem"' EXIT

RUNTIME="$(sparsek_oci_runtime)"
case "$BUILDER" in
  docker) CMD=(docker build) ;;
  podman) CMD=(podman build --layers --force-rm --pull=false --ignorefile "$HERE/Dockerfile.dockerignore") ;;
  buildah)
    CMD=(buildah bud --layers --force-rm --pull=false --network host
         --ignorefile "$HERE/Dockerfile.dockerignore") ;;
esac
if [ "$BUILDER" != docker ] && [ -n "$RUNTIME" ]; then
  CMD+=(--runtime "$RUNTIME")
fi

echo "== $BUILDER: building $TAG (target $TARGET${BASE:+, base $BASE})"
START=$(date +%s)
(cd "$ROOT" && "${CMD[@]}" "${ARGS[@]}" "${EXTRA[@]}" .)
SECONDS_TAKEN=$(( $(date +%s) - START ))
printf '== built %s with %s in %dm%02ds: %s\n' "$TAG" "$BUILDER" \
  $((SECONDS_TAKEN / 60)) $((SECONDS_TAKEN % 60)) "$(sparsek_image_size "$BUILDER" "$TAG")"
if [ "$RUN" = 1 ]; then
  "$HERE/run.sh" "$TAG"
fi
