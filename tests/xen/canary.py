"""A control for the daemon's deaths in dom0 (XS_XENVM_CANARY=1, see README, Reliability).

Our daemon has been seen to die of a fault inside the interpreter (a dict lookup, a cell, a
logging record: corrupt object pointers in plain Python code) while other dom0 processes crashed
on the platform's memory corruption.  This process does what the daemon's interpreter does most
(dicts keyed by XenStore paths, bytes values, logging calls) with the same interpreter, the same
imports and no Xen device, no ctypes and no mmap at all.  If it dies the same way, about as
often, the corruption is the platform's; if only the daemon dies, the daemon's own native work
(ctypes, mapped ring pages, the journal's mapped windows) is the suspect.

Run by dom0-init.sh with the daemon's interpreter and PYTHONFAULTHANDLER=1: a fault prints its
Python stack to the canary's log.  It prints a heartbeat with dom0's uptime every 5 s, so that
its last line bounds when it died.
"""

from __future__ import annotations

import logging
import os
import time

import trio  # noqa: F401 - the daemon's footprint: the same modules in memory

import xenstored.core  # noqa: F401

log = logging.getLogger("canary")


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def main() -> None:
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.DEBUG)  # noqa: SIM115 - for the process's life
    store: dict[str, bytes] = {}
    n = 0
    beat = time.monotonic()
    print(f"canary: started t={uptime():.2f}", flush=True)
    while True:
        for i in range(50):
            key = f"/local/domain/{i % 7}/data/key{n % 1000}"
            store[key] = (key * 2).encode()
            log.debug("canary %s %d", key, len(store[key]))
            if len(store) > 5000:
                store.clear()
            n += 1
        if time.monotonic() - beat >= 5:
            beat = time.monotonic()
            print(f"canary: alive t={uptime():.2f} ops={n}", flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
