#!/bin/busybox sh
# The guest's /init: its kernel's xenbus driver and Debian's xenstore-* tools (over
# /dev/xen/xenbus) read, write and watch, answering dom0's ping through a watch.  Results go to
# XenStore (data/result, read by dom0) and to the guest console (xenconsoled's log in dom0).
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "guest: userspace up, $(ls /dev/xen 2>&1 | tr '\n' ' ')"
# dom0's `xl shutdown` ends in the kernel's orderly_poweroff, which runs /sbin/poweroff (busybox:
# it signals PID 1, this script, with SIGUSR2): power off for real.
trap 'echo "guest: poweroff requested"; sync; poweroff -f' USR2
ln -s /bin/busybox /sbin/poweroff  # the kernel's poweroff_cmd (busybox installed itself in /bin)
trap 'echo "guest: reboot requested"; sync; reboot -f' TERM
# Every sysrq key, for dom0's diagnosis of a guest that stops answering: it asks for the blocked
# tasks through this console (^O w), which works even when the kernel's XenStore watches do not.
echo 1 > /proc/sys/kernel/sysrq

# The device run (xsvm.devices=1 on the kernel command line): frontends, then wait for xvda.
boot=1
devinfo=""
if grep -q xsvm.devices=1 /proc/cmdline; then
    for m in $(cat /lib/modules/load.list); do insmod "/lib/modules/$m" || echo "guest: insmod $m failed"; done
    i=0
    # blkfront connects after the backend's hotplug script ran: 30 s were not always enough on a
    # loaded host (seen after a reboot, with the host's load average near 10)
    while [ ! -b /dev/xvda ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
    # vbd-write leaves a mark in sector 64 of xvda: finding it means this is a boot after a reboot.
    diskmark=$(dd if=/dev/xvda bs=512 skip=64 count=1 2>/dev/null | head -c 40 | tr -dc 'A-Za-z0-9:.-')
    case "$diskmark" in XSVM-MARK*) boot=2 ;; esac
    devinfo=" boot=$boot disks=$(ls /sys/block | grep xvd | tr '\n' ',') nets=$(ls /sys/class/net | tr '\n' ',') mark=$diskmark"
    echo "guest: devices:$devinfo"
fi

errors=""
check() {  # check <what> <expected> <actual>
    if [ "$2" != "$3" ]; then errors="$errors $1(want '$2' got '$3')"; fi
}

domid=$(xenstore-read domid 2>&1)
name=$(xenstore-read name 2>&1)
echo "guest: domid=$domid name=$name"
home=/local/domain/$domid
check abs-read "$name" "$(xenstore-read $home/name 2>&1)"
xenstore-write data/scratch "x y z" || errors="$errors write"
check rel-read "x y z" "$(xenstore-read data/scratch 2>&1)"
check list "scratch" "$(xenstore-list data 2>&1)"
xenstore-rm data/scratch || errors="$errors rm"
xenstore-exists data/scratch 2>/dev/null && errors="$errors rm-left-node"
# Privileged nodes must stay out of reach.
xenstore-write /local/domain/0/evil 1 2>/dev/null && errors="$errors wrote-dom0-node"

# Watch (relative paths) first, then announce ourselves: dom0 writes data/to-guest on seeing it.
# Both watches feed one FIFO that this shell blocks on with its `read` builtin: no process is
# started while nothing happens (a loop polling with grep started ~20 a second, and under QEMU TCG
# every process start is a chance for the platform's memory corruption, see README).
mkfifo /tmp/events
exec 3<> /tmp/events
xenstore-watch data/to-guest >&3 2>&1 &
WT=$!
# dom0's commands (the device run): data/cmd = "<seq>:<shell>", run in this shell (so that
# variables it sets stay in this process's memory, e.g. across save/restore), answered with
# data/cmd-reply = "<seq>:<exit status>:<output on one line>".
xenstore-watch data/cmd >&3 2>&1 &
WC=$!
# A watcher that died is restarted (checked with builtins only, no process started); a death by a
# signal is the platform's crash (README, Reliability), printed so that the host sees it.  The
# restarted watch fires once, which also delivers an event the dead one may have missed.
died() {  # died <status> <path>
    if [ "$1" -gt 128 ]; then
        echo "guest: xenstore-watch $2 killed by signal $(($1 - 128)), restarted" > /dev/console
    elif [ "$1" = 127 ]; then  # wait's "no such child": the shell had reaped it in passing
        echo "guest: xenstore-watch $2 ended, its status lost (reaped earlier), restarted" > /dev/console
    else
        echo "guest: xenstore-watch $2 exited with status $1, restarted" > /dev/console
    fi
}
gone() {  # gone <pid>: exited (a zombie counts: this shell reaps its children lazily)
    [ -r /proc/$1/stat ] || return 0
    read -r _ _ st _ < /proc/$1/stat
    [ "$st" = Z ]
}
check_watchers() {
    if gone $WT; then
        wait $WT; died $? data/to-guest; xenstore-watch data/to-guest >&3 2>&1 & WT=$!
    fi
    if gone $WC; then
        wait $WC; died $? data/cmd; xenstore-watch data/cmd >&3 2>&1 & WC=$!
    fi
}
# busybox's `read -t` drops the bytes it has taken when its deadline passes mid-line: an event
# that arrives in a timeout's last instant reaches the next `read` without its head (seen: "ata/cmd",
# once in 8 device runs; the command was lost and the guest looked hung, though the daemon had
# delivered the event and the guest's kernel had read it off the ring).  xenstore-watch prints
# the watched path alone, so a tail of one of ours stands for it.
whole_event() {  # sets ev to the watched path whose tail it is
    case "$ev" in data/cmd | data/to-guest | "") return ;; esac
    for p in data/cmd data/to-guest; do
        case "$p" in *"$ev")
            echo "guest: event '$ev' read without its head (busybox's read -t): taken as $p" > /dev/console
            ev=$p; return ;;
        esac
    done
}
initial=""
while read -t 10 -r ev <&3; do  # each watch fires once when registered
    whole_event
    case "$ev" in
    *to-guest*) initial="$initial t" ;;
    *data/cmd*) initial="$initial c" ;;
    *) echo "guest: a watcher said: $ev" ;;  # its error message (stderr shares the FIFO)
    esac
    case "$initial" in *t*c* | *c*t*) break ;; esac
done
case "$initial" in *t*) ;; *) errors="$errors no-initial-watch-event" ;; esac
xenstore-write data/guest-up "domid=$domid name=$name$devinfo"
echo "guest: announced, waiting for dom0"
first=1
lastseq=""
handle_event() {  # one watch event, ev: the path that fired
    case "$ev" in
    *data/cmd*)
        # Logged on arrival (guest uptime, a builtin read): a command that never shows up here
        # never reached this shell; one that does and goes no further hung in the read below.
        read -r up _ < /proc/uptime
        echo "guest: [$up] event data/cmd"
        cmd=$(xenstore-read data/cmd 2> /tmp/read.err); st=$?
        err=""; [ $st != 0 ] && read -r err < /tmp/read.err
        if [ $st -gt 128 ]; then  # the platform's crash (README): say so, and read again
            echo "guest: xenstore-read data/cmd killed by signal $((st - 128)), read again"
            cmd=$(xenstore-read data/cmd 2> /tmp/read.err); st=$?
        elif [ $st != 0 ] && case "$err" in *"couldn't read path"*) false ;; *) true ;; esac; then
            # Not the node missing (a restore's re-registered watch): the tool itself failed,
            # seen as ld.so's "Inconsistency detected by ld.so: dl-version.c: 204" (exit 127),
            # the platform's crash in another guise; the command would be lost: read again.
            echo "guest: xenstore-read data/cmd failed (exit $st: $(echo "$err" | head -c 160)), read again"
            cmd=$(xenstore-read data/cmd 2> /tmp/read.err); st=$?
        fi
        # Fails after a restore's re-registered watch fires before dom0 wrote the new domain's
        # data/cmd: not a loss, but said, since a command that silently vanished looks the same.
        [ $st != 0 ] && echo "guest: xenstore-read data/cmd exit $st: $(head -c 100 /tmp/read.err)"
        seq=${cmd%%:*}
        # A watch also fires when it is re-registered (after a restore): run each command once.
        if [ -n "$cmd" ] && [ "$seq" != "$lastseq" ]; then
            lastseq=$seq
            read -r up _ < /proc/uptime
            echo "guest: [$up] cmd $cmd"
            # A syntax error in eval would end this shell (PID 1): check it first.
            if sh -n -c "${cmd#*:}" > /tmp/cmd.out 2>&1; then
                eval "${cmd#*:}" > /tmp/cmd.out 2>&1
                rc=$?
            else
                rc=2
            fi
            out=$(tr '\n' ' ' < /tmp/cmd.out | head -c 1500)
            xenstore-write data/cmd-reply "$seq:$rc:$out"
            read -r up _ < /proc/uptime
            echo "guest: [$up] cmd $seq exit $rc: $out"
        fi
        ;;
    *to-guest*)
        token=$(xenstore-read data/to-guest 2>/dev/null) || return  # re-registered, no ping yet
        echo "guest: watch fired: $ev value=$token"
        if [ -n "$first" ]; then
            if [ -z "$errors" ]; then result="ok domid=$domid"; else result="FAIL$errors"; fi
            xenstore-write data/result "$result"
            echo "guest: result $result"
            first=""
        fi
        xenstore-write data/from-guest "pong:$token"
        echo "guest: answered pong:$token (exit $?)"
        ;;
    *) echo "guest: a watcher said: $ev" ;;
    esac
}
while true; do
    # A timeout (no process started) so that the poweroff trap runs within a second.
    if ! read -t 1 -r ev <&3; then
        check_watchers
        continue
    fi
    whole_event
    if [ -z "$ev" ]; then  # every byte but the newline lost: either path (each is idempotent)
        echo "guest: an event read without its head or path (busybox's read -t): taken as both" > /dev/console
        ev=data/cmd; handle_event; ev=data/to-guest; handle_event
    else
        handle_event
    fi
done
