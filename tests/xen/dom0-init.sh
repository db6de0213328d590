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
# bash's /dev/stdin and /dev/fd (the hotplug scripts' locking.sh stats /dev/stdin)
ln -s /proc/self/fd /dev/fd; ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr

now() { read -r up _ < /proc/uptime; echo "$up"; }
alive() {  # alive <pid>: running (a zombie is not: /init reaps its orphans lazily); builtins only
    st=""
    [ -r /proc/$1/stat ] && read -r _ _ st _ < /proc/$1/stat
    [ -n "$st" ] && [ "$st" != Z ]
}
mark() { echo "XSVM $* t=$(now)"; }
FAILED=""

dump() {  # dump <label> <file>: a bounded excerpt, framed so the host can find it
    [ -s "$2" ] || return 0
    echo "XSVM-DUMP-BEGIN $1"
    tail -n "${3:-60}" "$2"
    echo "XSVM-DUMP-END $1"
}

finish() {
    : > /run/xsvm-finished  # the daemon's watch stops (it may be the one calling this)
    # A general protection fault counts too: the platform's wild pointers fault either way
    # (busybox's malloc has been seen to take a GP on one, which the kernel does not call a segfault).
    mark "PLATFORM dom0-segfaults=$(dmesg | grep -cE 'segfault|general protection fault')"
    if [ -n "$FAILED" ]; then
        mark "VERDICT FAIL $FAILED"
        dump xenstored /run/xenstored.log 80
        dump xenstored-trace /run/xenstored-trace.log 60
        grep -E 'guest-up|to-guest|from-guest|data/result|INTRODUCE|RELEASE' /run/xenstored-trace.log \
            > /tmp/trace-data 2>/dev/null
        dump xenstored-trace-data-exchange /tmp/trace-data 60
        for f in /var/log/xen/*.log; do dump "${f##*/}" "$f" 40; done
        dmesg | tail -n 30 > /tmp/dmesg.tail; dump dom0-dmesg /tmp/dmesg.tail
        dump guest-commands /tmp/gcmd.log 20
        # Last, so that a log cut to its end keeps it: why a guest stopped answering.
        dump guest-lost $GUEST_DIAG 250
    else
        mark "VERDICT PASS"
        [ -n "$XSVM_VERBOSE" ] && dump xenstored /run/xenstored.log 200
    fi
    if [ -n "$CANARY" ]; then  # XS_XENVM_CANARY=1 (canary.py): did the control process survive?
        if alive $CANARY; then
            mark "NOTE canary alive (pid $CANARY): $(tail -n 1 /run/canary.log)"
        else
            mark "NOTE canary DIED (pid $CANARY): $(grep -m 1 '^Fatal Python error' /run/canary.log); last heartbeat: $(grep 'canary: ' /run/canary.log | tail -n 1)"
            dump canary /run/canary.log 40
            dmesg | grep -E "\[$CANARY\]" > /tmp/canary.dmesg; dump canary-dmesg /tmp/canary.dmesg
        fi
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
# Not /tmp: the checkout under test may live there (CI's clone), and it must stay visible.  The
# chrooted daemon gets a writable temporary directory under /run instead (TMPDIR below).
for d in dev proc sys run; do mount -o rbind "/$d" "/host/$d" || fail share "bind /$d"; done
mkdir -p /run/xsvm-tmp
ok share ""
: > /etc/xen/xl.conf

# HP_EXEC=exec host_python ... &: the background job *is* the interpreter (for the daemon, whose
# pid is what kill -9 and the watch below need); without exec, busybox runs the command as a
# child of the job's subshell, and $! names that subshell.
# PYTHONFAULTHANDLER: an interpreter killed by a fault first writes every thread's Python stack
# to stderr (the daemon's log, dumped by daemon_watch): where in the daemon's code it faulted,
# which tells a fault in its own ctypes or mmap work from one in plain Python (the platform's).
host_python() {  # the host's interpreter and this checkout, chrooted into the read-only share
    $HP_EXEC chroot /host /usr/bin/env -i PATH=/usr/bin:/bin LD_LIBRARY_PATH="$XSVM_LIBDIR" TMPDIR=/run/xsvm-tmp \
        PYTHONDONTWRITEBYTECODE=1 PYTHONFAULTHANDLER=1 PYTHONPATH="$XSVM_PYTHONPATH" "$XSVM_PYTHON" "$@"
}
if [ -n "$XSVM_PROBE" ]; then  # --probe FILE: a diagnostic script, run before the daemon starts
    echo "XSVM-DUMP-BEGIN probe"; host_python "$XSVM_PROBE" 2>&1; echo "XSVM-DUMP-END probe"
fi

if [ -n "$XSVM_PYTIME" ]; then  # XS_XENVM_PYTIME=1: what the daemon's start-up owes to Python over 9p
    for c in pass pass 'import trio' 'import trio' 'import xenstored.cli' 'import xenstored.cli'; do
        ta=$(now); host_python -c "$c"; mark "PYTIME $(awk "BEGIN{print $(now) - $ta}")s python3 -c '$c'"
    done
fi

# A plain-Python control beside the daemon (XS_XENVM_CANARY=1, canary.py, README): started
# before daemon_watch, whose finish() must know it too when the daemon dies.
CANARY=""
if [ -n "$XSVM_CANARY" ]; then
    HP_EXEC=exec host_python "$XSVM_CANARY" > /run/canary.log 2>&1 &
    CANARY=$!
fi

# --- the system XenStore
# A request queued in dom0's kernel ring before the daemon runs: what any libxenstore client
# sends when the daemon's socket does not accept its connect() yet (xs_open() then falls back to
# /dev/xen/xenbus, whose kernel driver writes into /proc/xen/xsd_kva and kicks a port nobody has
# bound).  The daemon must answer it once it maps the ring, as C xenstored does (its dom0_init
# keeps the ring's indexes); answered at the dom0-early-ring stage below.
XENSTORED_PATH=/dev/xen/xenbus timeout 300 xenstore-write /tool/xsvm/early-ring queued > /tmp/early-ring.log 2>&1 &
EARLY=$!
sleep 0.2
t0=$(now)
if [ "$XSVM_DAEMON" = ours ]; then
    HP_EXEC=exec host_python -m xenstored -N -V -T /run/xenstored-trace.log > /run/xenstored.log 2>&1 &
else
    xenstored -N -T /run/xenstored-trace.log > /run/xenstored.log 2>&1 &
fi
XSD_PID=$!
echo $XSD_PID > /run/xsd.pid

# The daemon, watched from the side.  Should it die, every xenstore-* call after that falls back
# to dom0's kernel ring, which nobody serves any more, and blocks for ever: the script would hang
# without a word until the host's timeout (seen once: the guest's round trip failed, then a read
# hung; Xen's event-channel dump showed none of the daemon's bindings left).  This loop says at
# once that it died and how (its log's last lines, the kernel's word on it), and ends the run if
# the script does not reach its verdict within 90 s.  Builtins only while the daemon lives.
daemon_watch() {
    mkfifo /run/xsd-watch.fifo && exec 8<> /run/xsd-watch.fifo  # read -t on it: a sleep
    while :; do
        # every 0.25 s: the mark's time stands for the death's (the host pairs a fault of the
        # daemon with another process's fault just before it, xenvm.py's DEATH_NOTICED_WITHIN)
        read -t 0.25 _ <&8
        [ -e /run/xsvm-finished ] && return
        read -r p < /run/xsd.pid
        case "$p" in '' | *[!0-9]*) continue ;; esac  # being restarted (crash-restart stages)
        alive $p && continue
        read -r q < /run/xsd.pid
        [ "$q" = "$p" ] || continue  # restarted meanwhile
        mark "DAEMON-DIED pid $p (state '${st:-reaped}'); its log's last lines and the kernel's lines about it follow"
        {
            # faulthandler's report (PYTHONFAULTHANDLER, above) when it died of a fault
            if grep -q '^Fatal Python error' /run/xenstored.log; then
                sed -n '/^Fatal Python error/,$p' /run/xenstored.log | head -n 60
            else
                tail -n 30 /run/xenstored.log
            fi
            echo "== dmesg"; dmesg | grep -iE "\[$p\]|segfault|general protection|traps:|oom" | tail -n 10
            echo "== trace"; tail -n 15 /run/xenstored-trace.log
        } > /tmp/daemon-died 2>&1
        dump daemon-died /tmp/daemon-died 100
        i=0
        while [ $i -lt 90 ]; do
            read -t 1 _ <&8; [ -e /run/xsvm-finished ] && return; i=$((i + 1))
        done
        FAILED="xenstored-alive: the daemon (pid $p) died and the script hung on XenStore since"
        finish
    done
}
daemon_watch &
# Ready means answering on the socket, not the socket file existing: our daemon binds the path
# first (so a second daemon stops before touching the hypervisor) but listen()s only once it
# serves, and a connect() in between is refused.  XENSTORED_PATH pins both of libxenstore's
# tries to the socket, so this probe never falls back to the kernel ring.
sock_ready() { XENSTORED_PATH=/run/xenstored/socket timeout 5 xenstore-exists / 2> /tmp/probe.err; }
i=0
while [ ! -S /run/xenstored/socket ] && [ $i -lt 600 ]; do
    kill -0 $XSD_PID 2>/dev/null || break
    sleep 0.1; i=$((i + 1))
done
t1=$(now)
first="answered"
sock_ready || first="refused ($(head -c 60 /tmp/probe.err | tr '\n' ' '))"
while ! sock_ready && [ -S /run/xenstored/socket ] && [ $i -lt 600 ]; do
    kill -0 $XSD_PID 2>/dev/null || break
    sleep 0.1; i=$((i + 1))
done
t2=$(now)
if sock_ready; then
    ok xenstored "daemon=$XSVM_DAEMON startup=$(awk "BEGIN{print $t2 - $t0}")s (socket file at $(awk "BEGIN{print $t1 - $t0}")s, a connect() then: $first)"
elif [ -S /run/xenstored/socket ]; then
    fail xenstored "daemon=$XSVM_DAEMON created /run/xenstored/socket but does not answer on it: $(cat /tmp/probe.err)"; finish
else
    fail xenstored "daemon=$XSVM_DAEMON did not create /run/xenstored/socket"; finish
fi

# The request queued before the daemon started (above), answered through dom0's kernel ring.
i=0
while kill -0 $EARLY 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $EARLY 2>/dev/null; then
    fail dom0-early-ring "a request written to dom0's kernel ring before the daemon started is unanswered after 30 s"
    kill $EARLY 2>/dev/null
else
    wait $EARLY; rc=$?
    v=$(timeout 10 xenstore-read /tool/xsvm/early-ring 2>&1)
    if [ $rc = 0 ] && [ "$v" = queued ]; then
        ok dom0-early-ring "a write queued in dom0's kernel ring before the daemon started was answered"
    else
        fail dom0-early-ring "xenstore-write exit $rc ($(cat /tmp/early-ring.log)), node '$v'"
    fi
fi

# --- Debian's dom0 initialisation, then a sanity read through the socket
# In the background, so that a hang can be looked at: which file it talks to and where it sleeps.
timeout 60 xen-init-dom0 > /tmp/init-dom0.log 2>&1 &
INIT=$!
i=0
while kill -0 $INIT 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $INIT 2>/dev/null; then
    p=$(pidof xen-init-dom0)
    {
        echo "xen-init-dom0 (pid $p) still running after 15 s"
        for q in $p; do
            echo "== wchan: $(cat /proc/$q/wchan 2>&1)"; echo "== stack"; cat /proc/$q/stack 2>&1
            echo "== fds"; ls -l /proc/$q/fd 2>&1
        done
        echo "== socket"; ls -l /run/xenstored/ 2>&1
    } > /tmp/init-dom0.diag 2>&1
    dump init-dom0-hang /tmp/init-dom0.diag
fi
wait $INIT
rc=$?
if [ $rc = 0 ]; then
    n=$(timeout 10 xenstore-read /local/domain/0/name)
    if [ "$n" = Domain-0 ]; then ok xen-init-dom0 "name=$n"; else fail xen-init-dom0 "name=$n"; fi
else
    cat /tmp/init-dom0.log; fail xen-init-dom0 "exit $rc"; finish
fi
timeout 10 xenstore-ls -f > /tmp/ls0 2>&1 && ok xenstore-ls "$(wc -l < /tmp/ls0) nodes" \
    || { cat /tmp/ls0; fail xenstore-ls "exit"; }
# dom0's own kernel ring (/proc/xen/xsd_kva): /dev/xen/xenbus in dom0 goes through it.
n=$(XENSTORED_PATH=/dev/xen/xenbus timeout 10 xenstore-read /local/domain/0/name 2>&1)
if [ "$n" = Domain-0 ]; then ok dom0-xenbus "kernel ring read name=$n"; else fail dom0-xenbus "$n"; fi

# xenconsoled logs every guest's console to /var/log/xen/guest-<name>.log (dumped on failure).
xenconsoled --log=guest --log-dir=/var/log/xen --pid-file=/run/xenconsoled.pid > /tmp/xenconsoled.log 2>&1 &
# A socket client does not survive the daemon's death: its connection, and the watches on it, end
# with the process (only rings are recovered from the journal).  xenconsoled does not reconnect,
# so after a crash-restart it would still log the consoles it has but never see a new domain's
# (xl create/restore then time out waiting for the console tty); it is restarted, as its service
# manager would have to.  The new one picks up the running guests' consoles.
restart_xenconsoled() {
    p=$(cat /run/xenconsoled.pid 2>/dev/null)  # it daemonizes: $! is not its pid
    [ -n "$p" ] && kill $p 2>/dev/null
    i=0; while [ -n "$p" ] && alive $p && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    xenconsoled --log=guest --log-dir=/var/log/xen --pid-file=/run/xenconsoled.pid >> /tmp/xenconsoled.log 2>&1 &
}
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

# xs_clients: dom0's processes other than the daemon that hold a socket, "comm[pid]xN" (N
# sockets).  dom0 runs nothing else that uses sockets, so these are XenStore's socket clients:
# listed at a crash-restart's kill and after it, they show which long-lived clients a real host
# loses with the daemon (a client whose libxenstore reader thread saw the connection end closes
# its fd: its count drops).  Two process starts only (ls, awk): every start risks the platform's
# crash (README, Reliability).
xs_clients() {
    ls -l /proc/[0-9]*/fd 2>/dev/null | awk -v me="$XSD_PID" '
        /^\/proc\/[0-9]+\/fd:$/ { split($0, a, "/"); p = a[3]; next }
        / socket:\[/ { n[p]++ }
        END { for (p in n) if (p != me) print p, n[p] }' > /tmp/xs-clients 2>/dev/null
    out=""
    while read -r p k; do
        c="?"; [ -r /proc/$p/comm ] && read -r c < /proc/$p/comm
        out="$out $c[$p]x$k"
    done < /tmp/xs-clients
    echo "${out# }"
}

crash_restart() {  # kill -9 the daemon under a running guest; the same command brings it back
    ta=$(now)
    cl0=$(xs_clients)
    restart_daemon; n=$(timeout 5 xenstore-read /local/domain/0/name 2>&1)
    mark "NOTE crash-restart: socket clients at the kill: $cl0; after it: $(xs_clients)"
    restart_xenconsoled
    kill $W 2>/dev/null  # dom0's watcher lost its socket connection with the daemon
    tb=$(now)
    kill -0 $XSD_PID 2>/dev/null || { fail crash-restart "the restarted daemon died"; finish; }
    rec=$(grep -o 'recovered from the journal.*' /run/xenstored.log | tail -1 | head -c 160)
    [ "$n" = Domain-0 ] && ok crash-restart "$(awk "BEGIN{print $tb - $ta}")s: $rec" \
        || { fail crash-restart "no answer after restart: $n"; return; }
    ok cr-socket "name=$n"
    n=$(XENSTORED_PATH=/dev/xen/xenbus timeout 10 xenstore-read /local/domain/0/name 2>&1)
    [ "$n" = Domain-0 ] && ok cr-dom0-xenbus "kernel ring read name=$n" || fail cr-dom0-xenbus "$n"
    xenstore-watch $dp/data >> /tmp/w-$g.log 2>&1 &
    W=$!
    sleep 0.5
    roundtrip cr-guest-roundtrip  # the guest's kernel xenbus and its watch, across the crash
    timeout 30 xl list > /tmp/xl-list.log 2>&1 && grep -q "$name" /tmp/xl-list.log \
        && ok cr-xl-list "$(grep -c . /tmp/xl-list.log) lines" || { cat /tmp/xl-list.log; fail cr-xl-list "xl list"; }
}

restart_daemon() {  # kill -9 the daemon, run the same command again, wait until it answers
    echo restarting > /run/xsd.pid  # not a death for daemon_watch
    kill -9 $XSD_PID 2>/dev/null; wait $XSD_PID 2>/dev/null
    HP_EXEC=exec host_python -m xenstored -N -V -T /run/xenstored-trace.log >> /run/xenstored.log 2>&1 &
    XSD_PID=$!
    echo $XSD_PID > /run/xsd.pid
    i=0; n=""
    while [ $i -lt 600 ]; do
        kill -0 $XSD_PID 2>/dev/null || return 1
        n=$(timeout 2 xenstore-read /local/domain/0/name 2>/dev/null) && [ "$n" = Domain-0 ] && return 0
        sleep 0.1; i=$((i + 1))
    done
    return 1
}

stage_crash_devices() {  # the device run's crash-restart: disk and vif connected, daemon killed
    if [ "$XSVM_DAEMON" != ours ]; then
        ok crash-restart "not run: C xenstored cannot survive its own death (the control run)"; return
    fi
    gcmd 60 'sha256sum /dev/xvda'; before=${GOUT%% *}  # vbd-write changed the disk: now, then
    ta=$(now)
    cl0=$(xs_clients)
    # From the kill on, xl's monitor of this domain hears no watch event again (README: Crash
    # stages): nothing acts on its shutdown or reboot until a restore starts a new monitor.
    MONITOR_LOST="xl's monitor of dom$D lost its XenStore connection in crash-restart"
    restart_daemon || { dfail crash-restart "the restarted daemon did not answer"; GUEST_LOST=1; return; }
    tr=$(since $ta)
    mark "NOTE crash-restart: socket clients at the kill: $cl0; after it: $(xs_clients)"
    restart_xenconsoled
    gcmd 60 'echo 3 > /proc/sys/vm/drop_caches; sha256sum /dev/xvda'; rc=$?  # the guest's xenbus, then blkfront
    sum=${GOUT%% *}
    guest_ping; prc=$?
    # Each state read once: the verdict must judge what the line shows (a second xenstore-read
    # that a platform crash kills would fail a stage whose line says 4 and 4).
    bv=$(be_state vbd $VBD_A); bn=$(be_state vif 0)
    info="vbd backend $bv frontend $(fe_state vbd $VBD_A), vif backend $bn frontend $(fe_state vif 0)"
    if [ $rc = 0 ] && [ -n "$before" ] && [ "$sum" = "$before" ] && [ $prc = 0 ] && [ "$bv" = 4 ] && [ "$bn" = 4 ]; then
        ok crash-restart "answering ${tr}s after kill -9; the guest's xenbus, disk and vif work; $info"
    else
        dfail crash-restart "xvda exit $rc ($sum, before $before), ping exit $prc; $info"
    fi
}

# ----------------------------------------------------------------------------- the device run
# --devices: the PV guest gets a disk (xvda: a file, through libxl's `block` hotplug script, a
# loop device and xen-blkback) and a vif on xenbr0 (xen-netback, `vif-bridge`), and goes through
# hotplug, save/restore, reboot and shutdown.  Each stage is one XSVM STAGE line; a failing one
# dumps both sides' device nodes and the hotplug log right away.
has_stage() { case " $XSVM_DEVICES " in *" $1 "*) return 0 ;; esac; return 1; }
since() { awk "BEGIN{printf \"%.1f\", $(now) - $1}"; }
VBD_A=51712   # xvda = 202:0
VBD_B=51728   # xvdb = 202:16
BE=/local/domain/0/backend

SEQ=0
NL="
"
GUEST_LOST=""
MONITOR_LOST=""  # set when a crash-restart left xl's monitor of the guest deaf
sig_note() {  # sig_note <status> <what>: a tool killed by a signal is the platform's crash (README)
    case "$1" in 132 | 134 | 135 | 139) mark "PLATFORM $2 killed by signal $(($1 - 128))" ;; esac
}
gcmd() {  # gcmd <seconds> <shell>: run in the guest's /init shell; GOUT = its output; its status
    SEQ=$((SEQ + 1))
    # Wait on a watch rather than polling with xenstore-read: fewer process starts (see README).
    # It fires once when registered and once per change: the reply is the second event or later.
    timeout $1 xenstore-watch -n 2 $dp/data/cmd-reply > /tmp/gcmd.w 2>&1 &
    GW=$!
    wait_for /tmp/gcmd.w cmd-reply 10 || echo "cmd $((SEQ)) (dom$D): dom0's cmd-reply watch not registered within 10 s" >> /tmp/gcmd.log
    gt=$(now)
    # xenstore-read escapes a newline as \n: the guest gets the command on one line.  Joined by
    # the shell itself, not `echo | tr`: a tr killed by the platform's crash sent the guest an
    # empty command once (the crash-restart's checksum before the kill came back empty).
    c="$SEQ:${2//$NL/ }"
    xenstore-write $dp/data/cmd "$c"; ws=$?
    if [ $ws -gt 128 ]; then
        # Killed by the platform's crash (README), maybe after its write went through (seen: a
        # restore's first command ran in the guest while dom0's xenstore-write had died of a
        # segfault): write again; the guest runs each sequence number once.
        sig_note $ws "xenstore-write data/cmd (cmd $SEQ)"
        echo "cmd $SEQ (dom$D): xenstore-write killed by signal $((ws - 128)), written again" >> /tmp/gcmd.log
        xenstore-write $dp/data/cmd "$c"; ws=$?
    fi
    [ $ws = 0 ] || { kill $GW 2>/dev/null; GOUT="xenstore-write $dp/data/cmd failed (exit $ws)"; return 125; }
    i=0; how=watch
    while [ $i -lt $(($1 * 2)) ]; do
        wait $GW 2>/dev/null  # returns when the reply changed, at the timeout, or at once later
        ws=$?
        [ $i = 0 ] && [ $ws != 0 ] && how="polling after the watch ended with status $ws"
        r=$(xenstore-read $dp/data/cmd-reply 2>/dev/null)
        case "$r" in "$SEQ:"*)
            # How long each command took and how its reply was seen: a reply that only polling
            # found means a watch event (the guest's write to dom0's watcher) came late or never.
            echo "cmd $SEQ (dom$D): reply after $(since $gt)s (dom0 t=$(now)), seen by $how" >> /tmp/gcmd.log
            # A reply that dom0's watch missed (seen once in CI, 60 s late after a restore): the
            # trace says when the guest's reply reached the daemon and whether the daemon sent
            # dom0's watcher its event, so the next such log tells "late guest" from "lost event".
            [ "$how" = watch ] || grep -E "(WRITE \(data/cmd-reply $SEQ:|WATCH_EVENT \($dp/data/cmd-reply |WRITE \($dp/data/cmd $SEQ:)" \
                /run/xenstored-trace.log 2>/dev/null | tail -n 6 | cut -c1-110 | sed 's/^/    trace: /' >> /tmp/gcmd.log
            r=${r#*:}; GOUT=${r#*:}; return "${r%%:*}" ;;
        esac
        sleep 0.5; i=$((i + 1))
    done
    echo "cmd $SEQ (dom$D): no reply after $(since $gt)s" >> /tmp/gcmd.log
    GOUT="no reply from the guest within $1 s"; GUEST_LOST=1
    guest_lost_diag "$SEQ"
    return 124
}

# guest_lost_diag <seq>: a guest left a command unanswered.  Record, from every side at once,
# where the exchange stopped, so that the log alone tells "the daemon left a request unanswered
# or an event unsent" from "the guest hung elsewhere" (README, Reliability): dumped at the end.
#  * the guest's xenstore ring as the shared page holds it (ringdump.py, read-only, two looks a
#    second apart): a request it does not consume is the daemon's; replies/events the guest does
#    not read are the guest's (or a notification lost in Xen);
#  * the daemon's view of the domain (xenstore-control stats: queued output and events, requests
#    so far), its warnings (a domain it ignores, events it dropped), and the trace of the guest's
#    ring connection: what it received from and queued for the guest, and when;
#  * Xen's event channels of the guest (pending/masked bits) and of dom0 towards it;
#  * the guest's kernel: its blocked tasks (sysrq w), asked for through its console, which does
#    not go through XenStore (a guest whose xenwatch thread is stuck ignores control/sysrq).
GUEST_DIAG=/tmp/guest-lost.diag
guest_lost_diag() {
    [ -s $GUEST_DIAG ] && return  # the first loss says the most
    {
        echo "== dom$D left command $1 unanswered: data/cmd = '$(timeout 5 xenstore-read $dp/data/cmd 2>&1 | head -c 60)', data/cmd-reply = '$(timeout 5 xenstore-read $dp/data/cmd-reply 2>&1 | head -c 60)'"
        echo "== commands so far (dom0's side)"; tail -n 6 /tmp/gcmd.log
        echo "== the guest's xenstore ring (shared page)"
        # (timeout cannot run a function; exec, so that the kill below reaches the interpreter)
        HP_EXEC=exec host_python "$XSVM_RINGDUMP" "$D" 2 > /tmp/ringdump.out 2>&1 &
        rp=$!; i=0
        while kill -0 $rp 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        kill $rp 2>/dev/null && echo "(ringdump.py still running after 30 s: killed)"
        cat /tmp/ringdump.out
        echo "== the daemon's view (xenstore-control stats $D)"; timeout 10 xenstore-control stats "$D" 2>&1
        echo "== the daemon's warnings"; grep -E ' (WARNING|ERROR|CRITICAL) ' /run/xenstored.log | tail -n 15
        # The guest's ring connection in the trace: the only one with a relative data/cmd watch
        # (registered, or restored by a restarted daemon and then fired), in the running daemon
        # process: connection numbers start again in each, whose trace begins with a *** line.
        start=$(grep -n '^\*\*\*$' /run/xenstored-trace.log | tail -n 1 | cut -d: -f1)
        tail -n +"${start:-1}" /run/xenstored-trace.log > /tmp/trace-now 2>/dev/null
        id=$(grep -E ' (WATCH|WATCH_EVENT) \(data/cmd ' /tmp/trace-now | tail -n 1 | awk '{print $2}')
        echo "== trace of the guest's ring connection ${id:-?} (last 40 lines)"
        [ -n "$id" ] && grep "^[A-Z]* $id " /tmp/trace-now | tail -n 40
        echo "== trace: dom0's last writes of data/cmd"
        grep " WRITE ($dp/data/cmd " /tmp/trace-now | tail -n 3 | cut -c1-120
        echo "== Xen's event channels of dom$D, and dom0's towards it (p/m/s: pending/masked/selected)"
        xl debug-keys e; sleep 1
        xl dmesg 2>&1 | awk -v d="$D" '
            /Event channel information for domain/ { cur = $NF; sub(":", "", cur); hdr = $0; if (cur == d "") print; next }
            cur == d "" { print; next }
            cur == "0" && $0 ~ (" d=" d " ") { if (hdr) { print hdr; hdr = "" } print }' | tail -n 40
        echo "== the guest's blocked tasks (sysrq w through its console)"
        tty=$(timeout 5 xenstore-read $dp/console/tty 2>/dev/null)
        if [ -c "$tty" ]; then
            printf '\0179' > "$tty"; sleep 1; printf '\017w' > "$tty"; sleep 4
            echo "(sent to $tty; the guest's console below)"
        else
            echo "(no console tty for dom$D: '$tty')"
        fi
        for f in /var/log/xen/guest-*.log; do echo "-- ${f##*/}"; tail -n 60 "$f"; done
    } > $GUEST_DIAG 2>&1
    mark "GUEST-LOST dom$D command $1 unanswered; diagnosis dumped at the end (guest-lost)"
}

dev_diag() {  # dev_diag <stage>: what a failing device stage needs, printed right away
    {
        echo "== xl list"; timeout 10 xl list
        echo "== backends (/local/domain/0/backend)"; timeout 10 xenstore-ls -f $BE
        echo "== frontends ($dp/device)"; timeout 10 xenstore-ls -f $dp/device
        echo "== $dp/control"; timeout 10 xenstore-ls -f $dp/control
        echo "== losetup"; losetup -a
        echo "== links"; /usr/sbin/ip -br link; ls /sys/class/net/xenbr0/brif 2>&1
    } > /tmp/diag 2>&1
    dump "diag-$1" /tmp/diag 150
    dump xen-hotplug.log /var/log/xen/xen-hotplug.log 60
    for f in /tmp/xl-$1*.log; do dump "${f##*/}" "$f" 60; done
    for f in /var/log/xen/guest-*.log; do dump "${f##*/}" "$f" 40; done
    dmesg | tail -n 20 > /tmp/dmesg.tail; dump dom0-dmesg /tmp/dmesg.tail
}
dfail() { fail "$1" "$2"; dev_diag "$1"; }

be_state() { xenstore-read $BE/$1/$D/$2/state 2>/dev/null || echo none; }
fe_state() { xenstore-read $dp/device/$1/$2/state 2>/dev/null || echo none; }

# wait_gone <seconds> <path>...: until none of the nodes exists
wait_gone() {
    t=$1; shift; i=0
    while [ $i -lt $((t * 10)) ]; do
        left=""
        for n in "$@"; do xenstore-exists "$n" 2>/dev/null && left="$left $n"; done
        [ -z "$left" ] && return 0
        sleep 0.25; i=$((i + 2))
    done
    return 1
}

new_domid() {  # new_domid <old> <seconds>: wait for the guest's name to map to another domid
    i=0
    while [ $i -lt $(($2 * 5)) ]; do
        n=$(xl domid $name 2>/dev/null)
        [ -n "$n" ] && [ "$n" != "$1" ] && { echo "$n"; return 0; }
        sleep 1; i=$((i + 5))
    done
    return 1
}

# wait_node <seconds> <path> <text>: until the node's value contains the text
wait_node() {
    i=0
    while [ $i -lt $(($1 * 5)) ]; do
        v=$(xenstore-read "$2" 2>/dev/null) && case "$v" in *$3*) return 0 ;; esac
        sleep 0.5; i=$((i + 2))
    done
    return 1
}

devices_setup() {  # dom0's side before the guest exists: the bridge its vif joins
    ip link add xenbr0 type bridge stp_state 0 forward_delay 0 && ip addr add 10.99.0.1/24 dev xenbr0 \
        && ip link set xenbr0 up || fail devices-setup "bridge xenbr0"
    ok devices-setup "xenbr0 10.99.0.1/24, $(ls /dev/loop* 2>/dev/null | wc -l) loop devices, $(lsmod | grep -cE 'blkback|netback') backends"
}

stage_vbd_read() {
    ta=$(now)
    gcmd 60 'i=0; while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; sha256sum /dev/xvda'
    rc=$?
    sum=${GOUT%% *}
    info="backend state $(be_state vbd $VBD_A) hotplug-status $(xenstore-read $BE/vbd/$D/$VBD_A/hotplug-status 2>&1) node $(xenstore-read $BE/vbd/$D/$VBD_A/node 2>&1), frontend state $(fe_state vbd $VBD_A)"
    if [ $rc = 0 ] && [ "$sum" = "$XSVM_DISK1_SHA256" ]; then
        ok vbd-read "guest's sha256 of xvda (4 MiB) matches the host's image in $(since $ta)s; $info"
    else
        dfail vbd-read "exit $rc: $GOUT (want $XSVM_DISK1_SHA256); $info"
    fi
}

stage_vbd_write() {
    MARK="XSVM-MARK-$$-$(now)"
    ta=$(now)
    gcmd 60 "printf %s $MARK | dd of=/dev/xvda bs=512 seek=64 conv=notrunc,fsync 2>&1 && sync && echo synced"
    rc=$?
    got=$(dd if=/var/lib/xsvm/disk1.img bs=512 skip=64 count=1 2>/dev/null | head -c ${#MARK})
    if [ $rc = 0 ] && [ "$got" = "$MARK" ]; then
        ok vbd-write "guest wrote sector 64 and synced; dom0 read it back from the image in $(since $ta)s"
    else
        dfail vbd-write "guest exit $rc: $GOUT; image sector 64 starts '$(echo "$got" | head -c 40)', want $MARK"
    fi
}

guest_ping() {  # the guest pings dom0 (and configures eth0 first if needed)
    gcmd 60 'ip link set eth0 up; ip addr show eth0 | grep -q 10.99.0.2 || ip addr add 10.99.0.2/24 dev eth0;
        n=0; until ping -c 1 -W 2 10.99.0.1 > /tmp/ping; do n=$((n+1)); [ $n -ge 10 ] && break; done;
        tail -n 2 /tmp/ping; [ $n -lt 10 ]'
}
dom0_ping() {
    n=0
    until ping -c 1 -W 2 10.99.0.2 > /tmp/ping0 2>&1; do n=$((n + 1)); [ $n -ge 10 ] && return 1; done
}

stage_vif_ping() {
    ta=$(now)
    guest_ping; rc=$?; gout=$GOUT
    dom0_ping; rc0=$?
    info="vif$D.0 on xenbr0: $(ls /sys/class/net/xenbr0/brif 2>&1 | tr '\n' ' ') backend state $(be_state vif 0), frontend $(fe_state vif 0)"
    if [ $rc = 0 ] && [ $rc0 = 0 ]; then
        ok vif-ping "guest -> dom0 and dom0 -> guest in $(since $ta)s ($(grep -o 'time=[0-9.]* ms' /tmp/ping0)); $info"
    else
        dfail vif-ping "guest ping exit $rc ($gout); dom0 ping exit $rc0 ($(tail -n 2 /tmp/ping0 | tr '\n' ' ')); $info"
    fi
}

stage_block_attach() {
    ta=$(now)
    timeout 60 xl -v block-attach $name 'format=raw, vdev=xvdb, access=ro, target=/var/lib/xsvm/disk2.img' \
        > /tmp/xl-block-attach.log 2>&1
    rc=$?
    sig_note $rc "xl block-attach"
    tx=$(since $ta)
    gcmd 60 'i=0; while [ ! -b /dev/xvdb ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; sha256sum /dev/xvdb'
    grc=$?
    sum=${GOUT%% *}
    info="backend state $(be_state vbd $VBD_B), frontend state $(fe_state vbd $VBD_B), node $(xenstore-read $BE/vbd/$D/$VBD_B/node 2>&1)"
    if [ $rc = 0 ] && [ $grc = 0 ] && [ "$sum" = "$XSVM_DISK2_SHA256" ]; then
        ok block-attach "xl block-attach ${tx}s, guest read xvdb (sha256 matches) after $(since $ta)s; $info"
    else
        dfail block-attach "xl exit $rc; guest exit $grc: $GOUT (want $XSVM_DISK2_SHA256); $info"
    fi
}

# detach <stage> <kind> <devid> <xl command...>: the backend must reach Closed (6) within 10 s
# (libxl's own device timeout: past it libxl logs "Timeout reached, initiating forced remove"),
# and the device must then be gone from both sides' nodes and from the guest.  xl itself may
# take longer than 10 s in all under a loaded TCG host (its start-up alone takes seconds): 30 s.
detach() {
    st=$1; kind=$2; devid=$3; shift 3
    ta=$(now)
    timeout 60 xl -vvv "$@" > /tmp/xl-$st.log 2>&1
    rc=$?
    sig_note $rc "xl $1"
    tx=$(since $ta)
    closed=$(grep -c "backend $BE/$kind/$D/$devid/state wanted state 6 ok" /tmp/xl-$st.log)
    forced=$(grep -c "forced remove\|timed out" /tmp/xl-$st.log)
    tw=$(now)
    wait_gone 5 $BE/$kind/$D/$devid $dp/device/$kind/$devid; gone=$?
    tw=$(since $tw); tg=$(now)
    if [ "$kind" = vbd ]; then gtest='[ ! -e /sys/block/xvdb ]'; else gtest='[ ! -e /sys/class/net/eth0 ]'; fi
    gcmd 20 "i=0; until $gtest || [ \$i -ge 100 ]; do sleep 0.1; i=\$((i+1)); done; ls /sys/block /sys/class/net | tr '\n' ' '; $gtest"
    grc=$?; tg=$(since $tg)
    if [ $rc = 0 ] && [ "$closed" -ge 1 ] && [ "$forced" = 0 ] && [ $gone = 0 ] && [ $grc = 0 ] \
        && awk "BEGIN{exit !($tx < 30)}"; then
        ok $st "xl $1 ${tx}s (backend reached Closed), nodes gone on both sides (${tw}s), guest sees (${tg}s): $GOUT"
    else
        dfail $st "xl exit $rc in ${tx}s, 'wanted state 6 ok' x$closed, forced/timed out x$forced, nodes gone=$((1 - gone)) ($left), guest exit $grc: $GOUT"
    fi
}

watch_release() {  # start watching @releaseDomain into /tmp/rel-$1.log (REL = watcher pid)
    xenstore-watch @releaseDomain > /tmp/rel-$1.log 2>&1 &
    REL=$!
    wait_for /tmp/rel-$1.log "@releaseDomain" 10
}
released() {  # released <tag> <seconds>: @releaseDomain fired again
    i=0
    while [ $i -lt $(($2 * 10)) ]; do
        [ "$(count /tmp/rel-$1.log @releaseDomain)" -ge 2 ] && { kill $REL 2>/dev/null; return 0; }
        sleep 0.1; i=$((i + 1))
    done
    kill $REL 2>/dev/null
    return 1
}

stage_save() {
    gcmd 20 'KEEP="kept-$(cat /proc/sys/kernel/random/uuid)"; echo "$KEEP" > /tmp/keep; echo "$KEEP"'
    KEEP=${GOUT% }
    watch_release save
    ta=$(now)
    timeout 120 xl -v save $name /var/lib/xsvm/guest.save > /tmp/xl-save.log 2>&1
    rc=$?
    sig_note $rc "xl save"
    tx=$(since $ta)
    released save 20; rel=$?
    size=$(ls -l /var/lib/xsvm/guest.save 2>/dev/null | awk '{print $5}')
    if [ $rc = 0 ] && [ $rel = 0 ] && ! xl domid $name > /dev/null 2>&1 && ! xenstore-exists $dp 2>/dev/null \
        && [ -n "$KEEP" ]; then
        ok save "xl save ${tx}s ($((size >> 20)) MiB), suspended through control/shutdown, @releaseDomain fired, $dp gone"
    else
        dfail save "xl save exit $rc in ${tx}s, @releaseDomain fired=$((1 - rel)), domid now '$(xl domid $name 2>&1)', kept '$KEEP'"
        SAVED=""; return
    fi
    SAVED=1
}

stage_restore() {
    old=$D
    ta=$(now)
    timeout 120 xl -v restore /var/lib/xsvm/guest.save > /tmp/xl-restore.log 2>&1
    rc=$?
    sig_note $rc "xl restore"
    tx=$(since $ta)
    D=$(xl domid $name 2>/dev/null); dp=/local/domain/$D
    if [ $rc != 0 ] || [ -z "$D" ]; then dfail restore "xl restore exit $rc in ${tx}s"; GUEST_LOST=1; return; fi
    MONITOR_LOST=""  # xl restore leaves a new monitor for the restored domain
    gcmd 60 'echo "$KEEP $(cat /tmp/keep) domid=$(xenstore-read domid)"; dd if=/dev/xvda bs=512 skip=64 count=1 2>/dev/null | head -c 40; echo'
    grc=$?; gout=$GOUT
    v1=$(echo "$gout" | awk '{print $1}'); v2=$(echo "$gout" | awk '{print $2}')
    vbd=$(be_state vbd $VBD_A)/$(fe_state vbd $VBD_A)
    pingok=1; pgout=""
    if has_stage vif-ping; then guest_ping && dom0_ping && pingok=0; pgout=$GOUT; else pingok=0; fi
    if [ $grc = 0 ] && [ "$v1" = "$KEEP" ] && [ "$v2" = "$KEEP" ] && [ "$vbd" = 4/4 ] && [ $pingok = 0 ] \
        && echo "$gout" | grep -q "domid=$D " && [ "$D" != "$old" ]; then
        ok restore "xl restore ${tx}s: domid $old -> $D, shell variable and tmpfs file kept, guest's xenstore tools work, xvda $vbd$(has_stage vif-ping && echo ', ping both ways'), $(since $ta)s in all"
    else
        dfail restore "xl restore exit $rc in ${tx}s, domid $old -> $D; guest exit $grc: $gout (want $KEEP $KEEP domid=$D); vbd states $vbd; ping=$pingok (guest: $(echo "$pgout" | head -c 120))"
    fi
}

stage_reboot() {
    old=$D
    ta=$(now)
    timeout 60 xl -v reboot $name > /tmp/xl-reboot.log 2>&1
    rc=$?
    sig_note $rc "xl reboot"
    new=$(new_domid $old 120)
    if [ $rc != 0 ] || [ -z "$new" ]; then
        dfail reboot "xl reboot exit $rc, domid still '$(xl domid $name 2>&1)' after $(since $ta)s${MONITOR_LOST:+ ($MONITOR_LOST: nothing restarts the domain)}"; GUEST_LOST=1; return
    fi
    D=$new; dp=/local/domain/$D
    if ! wait_node 120 $dp/data/guest-up 'boot='; then
        dfail reboot "new domain $D never announced itself (data/guest-up)"; GUEST_LOST=1; return
    fi
    up=$(xenstore-read $dp/data/guest-up)
    want=1; has_stage vbd-write && want=2
    gone=0; wait_gone 10 $BE/vbd/$old $BE/vif/$old /local/domain/$old || gone=1
    if echo "$up" | grep -q "boot=$want " && echo "$up" | grep -q "disks=xvda," && [ $gone = 0 ]; then
        ok reboot "domid $old -> $D in $(since $ta)s, old domain's nodes gone; guest: $up"
    else
        dfail reboot "domid $old -> $D; guest-up '$up' (want boot=$want, disks=xvda); old nodes gone=$((1 - gone)) ($left)"
    fi
}

stage_shutdown() {
    watch_release shutdown
    ta=$(now)
    timeout 60 xl -v shutdown -w $name > /tmp/xl-shutdown.log 2>&1
    rc=$?
    sig_note $rc "xl shutdown"
    tx=$(since $ta)
    released shutdown 20; rel=$?
    how="xl's monitor destroyed it"
    if [ -n "$MONITOR_LOST" ] && [ $rc = 0 ]; then
        # The guest powered off, but the monitor that would destroy it is deaf (measured: it
        # stays shut down, "---s--", for ever): what a real host must do by hand after a
        # XenStore restart (README: Crash stages).  The daemon's part is checked all the same:
        # the domain's nodes and backends go when it is destroyed.
        timeout 30 xl destroy $D > /tmp/xl-destroy.log 2>&1
        how="destroyed by hand with xl destroy: $MONITOR_LOST"
    fi
    wait_gone 10 $BE/vbd/$D $BE/vif/$D $dp; gone=$?
    leftover=$(for k in vbd vif; do xenstore-list $BE/$k 2>/dev/null; done | tr '\n' ' ')
    if [ $rc = 0 ] && [ $rel = 0 ] && [ $gone = 0 ] && [ -z "$leftover" ]; then
        ok shutdown "clean xl shutdown in ${tx}s (guest powered off through control/shutdown), @releaseDomain fired, $BE/vbd/$D, $BE/vif/$D, $dp gone ($how)"
    else
        dfail shutdown "xl shutdown exit $rc in ${tx}s, @releaseDomain fired=$((1 - rel)), gone=$((1 - gone)) ($left), backends left: '$leftover' ($how)"
    fi
}

run_devices() {
    for st in $XSVM_DEVICES; do
        [ -n "$GUEST_LOST" ] && { fail "$st" "skipped: the guest is gone or not answering"; continue; }
        case $st in
            vbd-read) stage_vbd_read ;;
            vbd-write) stage_vbd_write ;;
            vif-ping) stage_vif_ping ;;
            crash-restart) stage_crash_devices ;;
            block-attach) stage_block_attach ;;
            block-detach) detach block-detach vbd $VBD_B block-detach $name xvdb ;;
            network-detach) detach network-detach vif 0 network-detach $name 0 ;;
            save) stage_save ;;
            restore) [ -n "$SAVED" ] && stage_restore || { fail restore "skipped: save failed"; GUEST_LOST=1; } ;;
            reboot) stage_reboot ;;
            shutdown) stage_shutdown; SHUTDOWN_DONE=1 ;;
        esac
    done
}

run_guest() {  # run_guest pv|pvh
    g=$1; name="guest-$g"; cfg=/etc/xen/$name.cfg
    {
        echo "name = \"$name\""
        echo "type = \"$g\""
        echo "kernel = \"$XSVM_GUEST_KERNEL\""
        echo "ramdisk = \"/guest.cpio\""
        # The device guest's memory is what xl save writes and xl restore reads back, page by page
        # under TCG: 96 MiB (its kernel, initramfs and busybox need far less)
        if [ -n "$XSVM_DEVICES" ]; then echo "memory = 96"; else echo "memory = 160"; fi
        echo "vcpus = 1"
        if [ -n "$XSVM_DEVICES" ]; then
            echo "extra = \"console=hvc0 rdinit=/init loglevel=4 xsvm.devices=1\""
            echo "disk = [ 'format=raw, vdev=xvda, access=rw, target=/var/lib/xsvm/disk1.img' ]"
            echo "vif = [ 'bridge=xenbr0, mac=00:16:3e:58:53:02' ]"
            echo "on_reboot = \"restart\""
        else
            echo "extra = \"console=hvc0 rdinit=/init loglevel=4\""
        fi
        echo "on_poweroff = \"destroy\""
        echo "on_crash = \"destroy\""
        [ "$g" = pvh ] && echo "tsc_mode = \"native\""
    } > $cfg
    mark "GUEST $g create"
    if ! timeout 120 xl create -p $cfg > /tmp/xl-create-$g.log 2>&1; then
        cat /tmp/xl-create-$g.log; fail "$g-create" "xl create"
        [ -n "$XSVM_DEVICES" ] && dev_diag "$g-create"
        return
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
        [ -z "$FAILED" ] && [ "$XSVM_DAEMON" = ours ] && crash_restart
    fi
    kill $W 2>/dev/null
    if [ -z "$FAILED" ] && [ -n "$XSVM_DEVICES" ]; then
        run_devices
        [ -n "$SHUTDOWN_DONE" ] && return
        D=$(xl domid $name 2>/dev/null); dp=/local/domain/$D
        [ -z "$D" ] && return
    fi
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

[ -n "$XSVM_DEVICES" ] && devices_setup
for g in $XSVM_GUESTS; do
    [ -z "$FAILED" ] && run_guest $g
done
finish
