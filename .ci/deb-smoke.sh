#!/usr/bin/env bash
# Install the built package with apt as an operator would, and prove the installed daemon
# serves with Debian's own /usr/bin/python3, python3-trio and python3-sortedcontainers (not
# pip's): started unprivileged-style with --emulate in a temporary run directory, in the
# foreground (-N, as under systemd) and forking with a pid file (as /etc/init.d/xen starts it),
# driven by Xen's xenstore-write/-read and by xenstore-guest as an emulated guest.  The package
# is purged at the end (its conffile must go with it), leaving the machine as it was.
# Usage: .ci/deb-smoke.sh PACKAGE.deb   (as root, or with sudo)
set -euo pipefail
deb=$(realpath "${1:?usage: $0 PACKAGE.deb}")
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
start=$SECONDS
$SUDO apt-get install -y -qq "$deb" >/dev/null 2>&1 ||
	{ $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$deb" >/dev/null; }
# What an init script has: no PYTHONPATH, no pyenv or venv, no pip settings.
sysenv=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
tmp=$(mktemp -d)
daemon=""
cleanup() {
	if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then kill -TERM "$daemon"; fi
	rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "deb-smoke: $*" >&2; exit 1; }

# 1. Which modules Debian's interpreter loads, isolated from the environment and user site.
where=$("${sysenv[@]}" /usr/bin/python3 -I -c \
	'import sortedcontainers, trio, xenstored; print(trio.__version__, trio.__file__, sortedcontainers.__file__, xenstored.__file__)')
echo "deb-smoke: /usr/bin/python3 loads trio $where"
for f in $where; do
	case "$f" in /usr/lib/python3/dist-packages/*|[0-9]*) ;; *) fail "$f is not Debian's (/usr/lib/python3/dist-packages)";; esac
done
for pkg in python3-trio python3-sortedcontainers xenstored-py; do
	dpkg-query -W -f='deb-smoke: ${Package} ${Version} installed\n' "$pkg"
done
head -1 /usr/sbin/xenstored-py | grep -qx '#!/usr/bin/python3' || fail "/usr/sbin/xenstored-py does not use /usr/bin/python3"

# 2. Foreground (-N), as systemd runs it; the process must be Debian's interpreter.
run="$tmp/run"
export XENSTORED_PATH="$run/socket"
"${sysenv[@]}" XENSTORED_PATH="$XENSTORED_PATH" /usr/sbin/xenstored-py --emulate --rundir "$run" -N \
	--config /etc/xen/xenstored.conf 2>"$tmp/log" &
daemon=$!
for _ in $(seq 100); do [ -S "$XENSTORED_PATH" ] && xenstore-read -s / >/dev/null 2>&1 && break; sleep 0.05; done
exe=$(readlink "/proc/$daemon/exe")
case "$exe" in /usr/bin/python3*) ;; *) fail "daemon runs $exe, not Debian's /usr/bin/python3";; esac
xenstore-write /local/domain/0/name Domain-0 /smoke/value "from the package"
[ "$(xenstore-read /smoke/value)" = "from the package" ] || fail "xenstore-read did not read back the value"
# A guest over its (emulated) ring, with the installed xenstore-guest and client library.
export FAKEXEN_DIR="$run/fx"
"${sysenv[@]}" FAKEXEN_DIR="$FAKEXEN_DIR" xenstore-guest 5 create
xenstore-write /local/domain/5 "" && xenstore-chmod /local/domain/5 n5
"${sysenv[@]}" XENSTORED_PATH="$XENSTORED_PATH" /usr/bin/python3 -I -c \
	'from xenstored.client import SyncClient; SyncClient().request(8, b"5\x000\x001\x00")'
"${sysenv[@]}" FAKEXEN_DIR="$FAKEXEN_DIR" xenstore-guest 5 write data/x hello
[ "$(xenstore-read /local/domain/5/data/x)" = hello ] || fail "the guest's write did not arrive"
kill -TERM "$daemon"
wait "$daemon" || fail "daemon exited $? after SIGTERM (want 0); log: $(cat "$tmp/log")"
daemon=""
[ ! -e "$XENSTORED_PATH" ] || fail "the socket outlived the daemon"
grep -q "ready: connect with XENSTORED_PATH=$XENSTORED_PATH" "$tmp/log" || fail "no ready line in the log"

# 3. Forking, started the way Debian 12's /etc/init.d/xen starts $XENSTORED (start-stop-daemon,
#    choom, $XENSTORED_ARGS then --pid-file), with an OOM adjustment a container may make (the
#    script's -1000 needs CAP_SYS_RESOURCE): it must return once the socket answers.
rm -rf "$run"
args=(--emulate --rundir "$run" --config /etc/xen/xenstored.conf --log-file "$tmp/forked.log")
"${sysenv[@]}" XENSTORED_PATH="$XENSTORED_PATH" start-stop-daemon --start --quiet \
	--pidfile "$tmp/xenstore.pid" --exec /usr/bin/choom -- -n 100 /usr/sbin/xenstored-py -- \
	"${args[@]}" --pid-file "$tmp/xenstore.pid" || fail "start-stop-daemon could not start it"
xenstore-read -s / >/dev/null || fail "the socket does not answer when the start returns"
daemon=$(cat "$tmp/xenstore.pid")
xenstore-write /smoke/forked yes && [ "$(xenstore-read /smoke/forked)" = yes ] ||
	fail "the forked daemon does not serve"
kill -TERM "$daemon"
for _ in $(seq 100); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.05; done
! kill -0 "$daemon" 2>/dev/null || fail "the forked daemon did not stop on SIGTERM"
daemon=""

# 4. Going back: purging removes the daemon and its conffile, nothing of Xen's.
$SUDO apt-get purge -y -qq xenstored-py >/dev/null
[ ! -e /usr/sbin/xenstored-py ] && [ ! -e /etc/xen/xenstored.conf ] || fail "purge left files behind"
echo "deb-smoke: installed package served over the socket and a guest ring; purged ($((SECONDS - start)) s)"
