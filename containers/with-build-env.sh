#!/bin/sh
# Run a Dockerfile step with pip pointed at the build's local inputs, which
# containers/build.sh puts in containers/local/ (the Dockerfile mounts containers/ at /ctx):
#   local/wheels/*.whl  wheels pip may install from besides the indexes (--wheels DIR)
#   local/ca.pem        the CA bundle pip trusts, for hosts behind a TLS-inspecting proxy
#                       (--ca-cert FILE)
# Neither is copied into an image.
set -eu
LOCAL="$(dirname "$0")/local"
if ls "$LOCAL"/wheels/*.whl >/dev/null 2>&1; then
  export PIP_FIND_LINKS="$LOCAL/wheels"
fi
if [ -s "$LOCAL/ca.pem" ]; then
  export PIP_CERT="$LOCAL/ca.pem"
fi
exec "$@"
