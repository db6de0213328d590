"""A blkfront-like frontend in a guest domain, negotiating a virtual block device with a backend
in dom0 through XenStore only, the way Linux blkfront and NetBSD xbd do.

Usage: frontend.py DOMID DEVID.  XenbusState: 1 Initialising, 2 InitWait, 3 Initialised,
4 Connected, 5 Closing, 6 Closed.  Prints the states it saw from the backend, one JSON line.
"""

import json
import sys

from xenstored.guest import Guest


def main() -> int:
    domid, devid = int(sys.argv[1]), sys.argv[2]
    fe = f"device/vbd/{devid}"
    seen: list[str] = []
    with Guest(domid, timeout=30.0) as g:
        backend = g.read(f"{fe}/backend").decode()
        g.watch(f"{backend}/state", "be")

        def backend_state() -> str:
            while True:
                g.wait_event(timeout=30.0)
                state = g.read(f"{backend}/state").decode()
                if not seen or seen[-1] != state:
                    seen.append(state)
                    return state

        while backend_state() != "2":  # backend reached InitWait: it published its features
            pass
        sectors = g.read(f"{backend}/sectors").decode()
        with g.transaction() as tx:  # publish the ring reference and event channel atomically
            g.write(f"{fe}/ring-ref", "8", tx)
            g.write(f"{fe}/event-channel", "11", tx)
            g.write(f"{fe}/protocol", "x86_64-abi", tx)
            g.write(f"{fe}/state", "3", tx)
        while backend_state() != "4":
            pass
        g.write(f"{fe}/state", "4")
        # ... the disk is in use; then the toolstack asks the device to go away.
        while backend_state() != "5":
            pass
        g.write(f"{fe}/state", "6")
        while backend_state() != "6":
            pass
    print(json.dumps({"seen": seen, "sectors": sectors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
