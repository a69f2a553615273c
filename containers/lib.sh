# Shared by build.sh, run.sh and base-rootfs.sh (sourced, not run).

# The image builder to use: $SPARSEK_BUILDER if set, else the first of docker (with a
# reachable daemon), podman, buildah. Prints its name; fails when there is none.
sparsek_builder() {
  if [ -n "${SPARSEK_BUILDER:-}" ]; then
    command -v "$SPARSEK_BUILDER" >/dev/null || return 1
    echo "$SPARSEK_BUILDER"
    return 0
  fi
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v podman >/dev/null; then
    echo podman
  elif command -v buildah >/dev/null; then
    echo buildah
  else
    return 1
  fi
}

# crun (the default OCI runtime of buildah and podman on many distributions) refuses hosts
# that mount cgroup v1 and v2 side by side ("hybrid"); runc runs there.
sparsek_oci_runtime() {
  if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && command -v runc >/dev/null; then
    echo runc
  fi
}

# Human-readable size of a local image.
sparsek_image_size() {
  local builder="$1" image="$2"
  case "$builder" in
    docker) docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB\n", $1 / 1e9}' ;;
    podman) podman image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB\n", $1 / 1e9}' ;;
    buildah) buildah images --format '{{.Size}}' "$image" ;;
  esac
}

# Whether the builder's local store holds the image (without pulling it).
sparsek_has_image() {
  local builder="$1" image="$2"
  case "$builder" in
    docker) docker image inspect "$image" >/dev/null 2>&1 ;;
    podman) podman image exists "$image" ;;
    buildah) buildah inspect --type image "$image" >/dev/null 2>&1 ;;
  esac
}
