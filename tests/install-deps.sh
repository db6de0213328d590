#!/usr/bin/env bash
# Install the Debian 12 packages the test suite drives the daemon with (run as root):
#  - xenstore-utils: Xen's own xenstore-read/-write/-ls/-rm/-chmod/-exists/-list/-watch;
#  - the real xenstore-control.  Debian's /usr/bin/xenstore-control is a wrapper that looks for a
#    running hypervisor; the program itself lives in xen-utils-4.17, whose full install would pull
#    in half of a Xen dom0.  So only its library dependency is installed and the one binary is
#    extracted to /usr/lib/xen-4.17/bin/xenstore-control, where the tests look for it.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(xenstore-utils libxenmisc4.17)
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 ||
	{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }
target=/usr/lib/xen-4.17/bin/xenstore-control
if [ ! -x "$target" ]; then
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && { apt-get download xen-utils-4.17 >/dev/null 2>&1 ||
		{ apt-get update -qq && apt-get download xen-utils-4.17 >/dev/null; }; })
	dpkg-deb -x "$tmp"/xen-utils-4.17_*.deb "$tmp/root"
	install -D -m 755 "$tmp/root/usr/lib/xen-4.17/bin/xenstore-control" "$target"
fi
"$target" --help >/dev/null 2>&1 || true
echo "test dependencies installed: $(command -v xenstore-ls), $target"
