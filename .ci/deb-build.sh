#!/usr/bin/env bash
# Build the Debian package the way an operator would, from a copy of the tracked files (so the
# build proves that a clean clone builds and leaves nothing in the checkout), then run lintian.
# Usage: .ci/deb-build.sh OUTDIR   (as root, or with sudo for apt-get).  Leaves OUTDIR/*.deb.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:?usage: $0 OUTDIR}")
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
deps=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian)
$SUDO apt-get install -y -qq --no-install-recommends "${deps[@]}" >/dev/null 2>&1 ||
	{ $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${deps[@]}" >/dev/null; }
# A Debian build environment: Debian's interpreters, no inherited PYTHONPATH or pip settings.
clean_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="${TMPDIR:-/tmp}" LANG=C.UTF-8)
rm -rf "$out" && mkdir -p "$out/src"
git ls-files -z | xargs -0 cp --parents -t "$out/src"
start=$SECONDS
(cd "$out/src" && "${clean_env[@]}" dpkg-buildpackage -us -uc -b >"$out/build.log" 2>&1) ||
	{ tail -40 "$out/build.log"; echo "dpkg-buildpackage failed (log: $out/build.log)" >&2; exit 1; }
echo "built $(cd "$out" && ls ./*.deb) in $((SECONDS - start)) s"
# Errors fail the build; warnings and infos are printed (debian/README.Debian explains them).
"${clean_env[@]}" lintian --fail-on error --display-info --pedantic "$out"/*.changes 2>&1 |
	grep -v 'running with root privileges' || true
"${clean_env[@]}" lintian --fail-on error "$out"/*.changes >/dev/null 2>&1 ||
	{ echo "lintian reported errors" >&2; exit 1; }
echo "lintian: no errors"
