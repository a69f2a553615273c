#!/usr/bin/env bash
# Make the base image locally, for build hosts that reach a package mirror but no container
# registry (air-gapped or filtered hosts): a minimal Ubuntu 24.04 (or Debian 12) root file
# system from debootstrap, committed with buildah as localhost/sparsek-base:SUITE.
#
#   containers/base-rootfs.sh            # noble (Ubuntu 24.04): localhost/sparsek-base:noble
#   containers/base-rootfs.sh bookworm   # Debian 12:            localhost/sparsek-base:bookworm
#   containers/build.sh --local-base prod   # then build on it
#
# Needs root (or `buildah unshare`), buildah and debootstrap (Debian/Ubuntu:
# `apt-get install buildah debootstrap`), and gpg. MIRROR overrides the package mirror.
# The image is what `ubuntu:24.04` is for the Dockerfile: apt, dpkg and a shell, with the
# noble, noble-updates and noble-security pockets configured and applied, documentation and
# translations left out by dpkg (as Ubuntu's minimized images do), no apt lists.
set -euo pipefail

SUITE="${1:-noble}"
case "$SUITE" in
  noble)
    MIRROR="${MIRROR:-http://archive.ubuntu.com/ubuntu}"
    POCKETS="noble noble-updates noble-security"
    COMPONENTS="main universe"  # as in ubuntu:24.04 (python3-venv is in universe)
    ;;
  bookworm)
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    POCKETS="bookworm bookworm-updates"
    COMPONENTS="main"
    ;;
  *) echo "usage: containers/base-rootfs.sh [noble|bookworm]" >&2; exit 2 ;;
esac
TAG="${SPARSEK_BASE_TAG:-localhost/sparsek-base:$SUITE}"

for tool in buildah debootstrap gpg; do
  command -v "$tool" >/dev/null || { echo "base-rootfs.sh: $tool not found" >&2; exit 1; }
done
if [ "$(id -u)" -ne 0 ] && [ -z "${_SPARSEK_UNSHARED:-}" ]; then
  # Rootless: buildah's user namespace makes us root over the container's files.
  exec env _SPARSEK_UNSHARED=1 buildah unshare bash "$0" "$@"
fi

# shellcheck source=containers/lib.sh
. "$(dirname "$0")/lib.sh"
RUNTIME="$(sparsek_oci_runtime)"
if [ -z "${BUILDAH_RUNTIME:-}" ] && [ -n "$RUNTIME" ]; then
  export BUILDAH_RUNTIME="$RUNTIME"
fi

WORK="$(mktemp -d)"
CTR=""
cleanup() {
  [ -z "$CTR" ] || buildah rm "$CTR" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The archive's signing key. Debian's is on every Debian host; Ubuntu's comes from the
# mirror's own pool and is trusted only if it holds the published fingerprint of the
# "Ubuntu Archive Automatic Signing Key (2018)", which signs noble's Release files.
if [ "$SUITE" = noble ]; then
  UBUNTU_KEY_FPR="F6ECB3762474EDA9D21B7022871920D1991BC93C"
  deb="$WORK/ubuntu-keyring.deb"
  curl -fsSL -o "$deb" "$MIRROR/pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb"
  dpkg-deb -x "$deb" "$WORK/keyring"
  KEYRING="$WORK/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg"
  if ! gpg --no-default-keyring --keyring "$KEYRING" --with-colons --list-keys 2>/dev/null \
      | grep -q "^fpr:::::::::$UBUNTU_KEY_FPR:"; then
    echo "base-rootfs.sh: the keyring from $MIRROR lacks key $UBUNTU_KEY_FPR" >&2
    exit 1
  fi
  # debootstrap knows every Ubuntu release by the same script.
  SCRIPT=/usr/share/debootstrap/scripts/gutsy
else
  KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
  SCRIPT=/usr/share/debootstrap/scripts/bookworm
fi

CTR="$(buildah from scratch)"
ROOT="$(buildah mount "$CTR")"

# Leave documentation out from the first package on (Ubuntu's minimized images do the same).
mkdir -p "$ROOT/etc/dpkg/dpkg.cfg.d"
cat > "$ROOT/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOF

echo "== debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase --components="${COMPONENTS// /,}" --keyring="$KEYRING" \
  "$SUITE" "$ROOT" "$MIRROR" "$SCRIPT"

{
  for pocket in $POCKETS; do echo "deb $MIRROR $pocket $COMPONENTS"; done
} > "$ROOT/etc/apt/sources.list"
rm -f "$ROOT/etc/apt/sources.list.d/"*.sources
cat > "$ROOT/etc/apt/apt.conf.d/90sparsek-base" <<'EOF'
APT::Install-Recommends "false";
Acquire::Languages "none";
EOF

# The updates and security pockets, then no apt lists or caches in the image.
buildah run --network host "$CTR" -- sh -c \
  'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q \
   && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log'
rm -rf "$ROOT/tmp/"* "$ROOT/var/cache/debconf/"*-old "$ROOT/var/lib/dpkg/"*-old

buildah umount "$CTR" >/dev/null
buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --label "org.opencontainers.image.description=sparsek base: $SUITE minbase from $MIRROR" "$CTR"
buildah commit --rm -q "$CTR" "$TAG" >/dev/null
CTR=""
echo "== made $TAG ($(buildah images --format '{{.Size}}' "$TAG"))"
