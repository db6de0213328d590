#!/bin/busybox sh
# dom0's /init: start the system XenStore daemon, then drive PV/PVH guests through xl and check
# that dom0 and each guest talk through XenStore (reads, writes, watches both ways) and that the
# guest's death is noticed.  Every result is one "XSVM ..." line on the console (hvc0 -> Xen ->
# serial), parsed by tests/xen/xenvm.py on the host.  Never let this script exit: /init dying
# panics dom0, so every path ends in finish().
/bin/busybox --install -s /bin
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
. /etc/xsvm.conf

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mkdir -p /run/xenstored /run/xen /var/lib/xen /var/log/xen /var/lock /etc/xen /host
[ -e /var/run ] || ln -s /run /var/run

now() { read -r up _ < /proc/uptime; echo "$up"; }
mark() { echo "XSVM $* t=$(now)"; }
FAILED=""

dump() {  # dump <label> <file>: a bounded excerpt, framed so the host can find it
    [ -s "$2" ] || return 0
    echo "XSVM-DUMP-BEGIN $1"
    tail -n "${3:-60}" "$2"
    echo "XSVM-DUMP-END $1"
}

finish() {
    mark "PLATFORM dom0-segfaults=$(dmesg | grep -c segfault)"
    if [ -n "$FAILED" ]; then
        mark "VERDICT FAIL $FAILED"
        dump xenstored /run/xenstored.log 80
        dump xenstored-trace /run/xenstored-trace.log 60
        grep -E 'guest-up|to-guest|from-guest|data/result|INTRODUCE|RELEASE' /run/xenstored-trace.log \
            > /tmp/trace-data 2>/dev/null
        dump xenstored-trace-data-exchange /tmp/trace-data 60
        for f in /var/log/xen/*.log; do dump "${f##*/}" "$f" 40; done
        dmesg | tail -n 30 > /tmp/dmesg.tail; dump dom0-dmesg /tmp/dmesg.tail
    else
        mark "VERDICT PASS"
        [ -n "$XSVM_VERBOSE" ] && dump xenstored /run/xenstored.log 200
    fi
    [ -n "$XSVM_SHELL" ] && sh
    sync
    poweroff -f
    sleep 60
}

fail() {  # fail <stage> <why>: record, and skip what depends on it
    mark "STAGE $1 FAIL $2"
    FAILED="${FAILED:+$FAILED; }$1: $2"
}

ok() { mark "STAGE $1 ok $2"; }

mark "INIT dom0"

# --- kernel modules (list and order computed on the host from .modinfo depends)
for m in $(cat /lib/modules/load.list); do
    insmod "/lib/modules/$m" || echo "insmod $m failed"
done
mount -t xenfs xenfs /proc/xen || { fail modules "mount xenfs"; finish; }
[ -e /dev/xen/evtchn ] && [ -e /dev/xen/gntdev ] && [ -e /dev/xen/privcmd ] \
    || { fail modules "missing /dev/xen devices: $(ls /dev/xen | tr '\n' ' ')"; finish; }
ok modules "xsd_port=$(cat /proc/xen/xsd_port)"

# --- the host's root, read-only: the host's python3 and this checkout run unchanged, and the
# guest kernel is read from the package cache
mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,ro host /host \
    || { fail share "mount 9p"; finish; }
for d in dev proc sys run; do mount -o rbind "/$d" "/host/$d" || fail share "bind /$d"; done
ok share ""
: > /etc/xen/xl.conf

host_python() {  # the host's interpreter and this checkout, chrooted into the read-only share
    chroot /host /usr/bin/env -i PATH=/usr/bin:/bin LD_LIBRARY_PATH="$XSVM_LIBDIR" \
        PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$XSVM_PYTHONPATH" "$XSVM_PYTHON" "$@"
}
if [ -n "$XSVM_PROBE" ]; then  # --probe FILE: a diagnostic script, run before the daemon starts
    echo "XSVM-DUMP-BEGIN probe"; host_python "$XSVM_PROBE" 2>&1; echo "XSVM-DUMP-END probe"
fi

# --- the system XenStore
t0=$(now)
if [ "$XSVM_DAEMON" = ours ]; then
    host_python -m xenstored -N -V -T /run/xenstored-trace.log > /run/xenstored.log 2>&1 &
else
    xenstored -N -T /run/xenstored-trace.log > /run/xenstored.log 2>&1 &
fi
XSD_PID=$!
i=0
while [ ! -S /run/xenstored/socket ] && [ $i -lt 600 ]; do
    kill -0 $XSD_PID 2>/dev/null || break
    sleep 0.1; i=$((i + 1))
done
t1=$(now)
if [ -S /run/xenstored/socket ]; then
    ok xenstored "daemon=$XSVM_DAEMON startup=$(awk "BEGIN{print $t1 - $t0}")s"
else
    fail xenstored "daemon=$XSVM_DAEMON did not create /run/xenstored/socket"; finish
fi

# --- Debian's dom0 initialisation, then a sanity read through the socket
if timeout 60 xen-init-dom0 > /tmp/init-dom0.log 2>&1; then
    n=$(timeout 10 xenstore-read /local/domain/0/name)
    if [ "$n" = Domain-0 ]; then ok xen-init-dom0 "name=$n"; else fail xen-init-dom0 "name=$n"; fi
else
    cat /tmp/init-dom0.log; fail xen-init-dom0 "exit $?"; finish
fi
timeout 10 xenstore-ls -f > /tmp/ls0 2>&1 && ok xenstore-ls "$(wc -l < /tmp/ls0) nodes" \
    || { cat /tmp/ls0; fail xenstore-ls "exit"; }
# dom0's own kernel ring (/proc/xen/xsd_kva): /dev/xen/xenbus in dom0 goes through it.
n=$(XENSTORED_PATH=/dev/xen/xenbus timeout 10 xenstore-read /local/domain/0/name 2>&1)
if [ "$n" = Domain-0 ]; then ok dom0-xenbus "kernel ring read name=$n"; else fail dom0-xenbus "$n"; fi

# xenconsoled logs every guest's console to /var/log/xen/guest-<name>.log (dumped on failure).
xenconsoled --log=guest --log-dir=/var/log/xen > /tmp/xenconsoled.log 2>&1 &
sleep 0.5

# wait_for <file> <pattern> <seconds>: poll a watch log for a line
wait_for() {
    i=0
    while [ $i -lt $(($3 * 10)) ]; do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1; i=$((i + 1))
    done
    return 1
}

count() {  # count <file> <pattern>: matching lines, -1 if grep itself failed (see README)
    n=$(grep -c "$2" "$1" 2>/dev/null)
    case "$n" in '' | *[!0-9]*) echo -1 ;; *) echo "$n" ;; esac
}

xen_state() {  # Xen's view (event channels, vcpus' pending upcalls) into the Xen console
    xl debug-keys e; xl debug-keys q; sleep 1
}

roundtrip() {  # roundtrip <stage>: dom0 writes data/to-guest, the guest's watch answers
    before=-1
    while [ "$before" -lt 0 ]; do before=$(count /tmp/w-$g.log "^$dp/data/from-guest"); done
    token="ping-$1-$$-$(now)"
    ta=$(now)
    xenstore-write $dp/data/to-guest "$token"
    i=0; got=""
    while [ $i -lt 300 ]; do
        [ "$(count /tmp/w-$g.log "^$dp/data/from-guest")" -gt "$before" ] && { got=1; break; }
        sleep 0.1; i=$((i + 1))
    done
    tb=$(now)
    if [ -z "$got" ]; then
        fail "$1" "no from-guest event"; xen_state; return
    fi
    v=$(xenstore-read $dp/data/from-guest)
    if [ "$v" = "pong:$token" ]; then ok "$1" "$(awk "BEGIN{print $tb - $ta}")s"; else fail "$1" "from-guest=$v"; fi
}

live_update() {  # replace the running daemon with a new process, a guest and watches alive
    ta=$(now)
    out=$(timeout 90 xenstore-control live-update -c "-m xenstored -N -V -T /run/xenstored-trace.log" "$XSVM_PYTHON" 2>&1)
    rc=$?
    tb=$(now)
    sleep 0.5
    kill -0 $XSD_PID 2>/dev/null || { fail live-update "daemon died (xenstore-control exit $rc: $out)"; finish; }
    if [ $rc != 0 ]; then fail live-update "xenstore-control exit $rc: $out"; return; fi
    ok live-update "$(awk "BEGIN{print $tb - $ta}")s: $(echo $out | head -c 80)"
    n=$(timeout 10 xenstore-read /local/domain/0/name 2>&1)
    [ "$n" = Domain-0 ] && ok lu-socket "name=$n" || fail lu-socket "$n"
    n=$(XENSTORED_PATH=/dev/xen/xenbus timeout 10 xenstore-read /local/domain/0/name 2>&1)
    [ "$n" = Domain-0 ] && ok lu-dom0-xenbus "name=$n" || fail lu-dom0-xenbus "$n"
    roundtrip lu-guest-roundtrip
}

run_guest() {  # run_guest pv|pvh
    g=$1; name="guest-$g"; cfg=/etc/xen/$name.cfg
    {
        echo "name = \"$name\""
        echo "type = \"$g\""
        echo "kernel = \"$XSVM_GUEST_KERNEL\""
        echo "ramdisk = \"/guest.cpio\""
        echo "memory = 160"
        echo "vcpus = 1"
        echo "extra = \"console=hvc0 rdinit=/init loglevel=4\""
        echo "on_poweroff = \"destroy\""
        echo "on_crash = \"destroy\""
        [ "$g" = pvh ] && echo "tsc_mode = \"native\""
    } > $cfg
    mark "GUEST $g create"
    if ! timeout 120 xl create -p $cfg > /tmp/xl-create-$g.log 2>&1; then
        cat /tmp/xl-create-$g.log; fail "$g-create" "xl create"; return
    fi
    D=$(xl domid $name)
    dp=/local/domain/$D
    ok "$g-create" "domid=$D"
    # Watch the guest's data directory before it runs, so nothing can be missed.
    xenstore-watch $dp/data > /tmp/w-$g.log 2>&1 &
    W=$!
    wait_for /tmp/w-$g.log "^$dp/data" 10 || fail "$g-watch" "dom0 initial watch event missing"
    xl unpause $D
    if wait_for /tmp/w-$g.log "^$dp/data/guest-up" 90; then
        ok "$g-guest-up" "$(xenstore-read $dp/data/guest-up)"
    else
        fail "$g-guest-up" "guest never wrote data/guest-up"; xen_state
    fi
    if [ -z "$FAILED" ]; then
        roundtrip "$g-watch-roundtrip"
        r=$(xenstore-read $dp/data/result 2>&1)
        case "$r" in ok*) ok "$g-guest-checks" "$r" ;; *) fail "$g-guest-checks" "$r" ;; esac
    fi
    if [ -n "$XSVM_STRESS" ]; then  # --stress N: spawn N processes in dom0 while the guest runs
        ta=$(now); bad=0; i=0
        while [ $i -lt "$XSVM_STRESS" ]; do
            [ "$(grep -c XSVM /etc/xsvm.conf)" -gt 0 ] || bad=$((bad + 1)); i=$((i + 1))
        done
        segv=$(dmesg | grep -c segfault)
        ok "$g-stress" "$XSVM_STRESS spawns in $(awk "BEGIN{print $(now) - $ta}")s: $bad failed, $segv segfaults in dmesg"
    fi
    if [ -z "$FAILED" ] && [ -n "$XSVM_LIVE_UPDATE" ] && [ "$g" = "${XSVM_GUESTS%% *}" ]; then
        live_update
    fi
    kill $W 2>/dev/null
    # Destroy: @releaseDomain must fire and the guest's nodes must be gone.
    xenstore-watch @releaseDomain > /tmp/rel-$g.log 2>&1 &
    R=$!
    wait_for /tmp/rel-$g.log "@releaseDomain" 10
    ta=$(now)
    timeout 60 xl destroy $D || fail "$g-destroy" "xl destroy exit $?"
    i=0; got=""
    while [ $i -lt 300 ]; do
        [ "$(count /tmp/rel-$g.log @releaseDomain)" -ge 2 ] && { got=1; break; }
        sleep 0.1; i=$((i + 1))
    done
    tb=$(now)
    kill $R 2>/dev/null
    if [ -n "$got" ]; then
        if xenstore-exists $dp 2>/dev/null; then
            fail "$g-destroy" "$dp still exists"
        else
            ok "$g-destroy" "@releaseDomain after $(awk "BEGIN{print $tb - $ta}")s, $dp gone"
        fi
    else
        fail "$g-destroy" "@releaseDomain did not fire"
    fi
}

for g in $XSVM_GUESTS; do
    [ -z "$FAILED" ] && run_guest $g
done
finish
