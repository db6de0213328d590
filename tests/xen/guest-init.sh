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

# Watch (relative path) first, then announce ourselves: dom0 writes data/to-guest on seeing it.
xenstore-watch data/to-guest > /tmp/w 2>&1 &
i=0
while ! grep -q to-guest /tmp/w && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
grep -q to-guest /tmp/w || errors="$errors no-initial-watch-event"
xenstore-write data/guest-up "domid=$domid name=$name"
echo "guest: announced, waiting for dom0"
# Answer every change of data/to-guest (the first one also carries our results).
seen=1
first=1
while true; do
    c=$(grep -c to-guest /tmp/w)
    if [ "$c" -gt "$seen" ]; then
        seen=$c
        token=$(xenstore-read data/to-guest 2>&1)
        echo "guest: watch fired ($c): $(tail -n 1 /tmp/w) value=$token"
        if [ -n "$first" ]; then
            if [ -z "$errors" ]; then result="ok domid=$domid"; else result="FAIL$errors"; fi
            xenstore-write data/result "$result"
            echo "guest: result $result"
            first=""
        fi
        xenstore-write data/from-guest "pong:$token"
        echo "guest: answered pong:$token (exit $?)"
    fi
    sleep 0.1
done
