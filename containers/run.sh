#!/usr/bin/env bash
# Run a command in a sparsek image with whichever tool the host has (docker, podman or
# buildah; $SPARSEK_BUILDER picks one). Without a command, the image's own (CMD).
#
#   containers/run.sh sparsek:prod                  # sparsek info
#   containers/run.sh sparsek:prod sparsek demo
#   containers/run.sh sparsek:ci                    # the test command
#
# With docker or podman, GPUs are passed in when the host has the NVIDIA driver (--gpus all,
# or podman's CDI device nvidia.com/gpu=all); buildah runs without them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=containers/lib.sh
. "$HERE/lib.sh"

[ $# -ge 1 ] || { echo "usage: containers/run.sh IMAGE [COMMAND ...]" >&2; exit 2; }
IMAGE="$1"
shift
BUILDER="$(sparsek_builder)" || { echo "run.sh: no docker, podman or buildah" >&2; exit 1; }
RUNTIME="$(sparsek_oci_runtime)"
HAS_GPU=0
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && HAS_GPU=1

case "$BUILDER" in
  docker)
    gpus=()
    [ "$HAS_GPU" = 0 ] || gpus=(--gpus all)
    exec docker run --rm "${gpus[@]}" "$IMAGE" "$@"
    ;;
  podman)
    opts=()
    [ "$HAS_GPU" = 0 ] || opts+=(--device nvidia.com/gpu=all)
    [ -z "$RUNTIME" ] || opts+=(--runtime "$RUNTIME")
    exec podman run --rm "${opts[@]}" "$IMAGE" "$@"
    ;;
  buildah)
    if [ $# -eq 0 ]; then  # the image's CMD, as docker would run it
      mapfile -t cmd < <(buildah inspect --type image --format '{{json .OCIv1.Config.Cmd}}' \
        "$IMAGE" | python3 -c 'import json, sys; print(*json.load(sys.stdin), sep="\n")')
      set -- "${cmd[@]}"
    fi
    ctr="$(buildah from --pull=never -q "$IMAGE")"
    trap 'buildah rm "$ctr" >/dev/null' EXIT
    opts=(--network host)
    [ -z "$RUNTIME" ] || opts+=(--runtime "$RUNTIME")
    buildah run "${opts[@]}" "$ctr" -- "$@"
    ;;
esac
