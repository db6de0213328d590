"""A guest that floods writes to its own home for a while (XSA-206, soak).

Usage: flood_writes.py DOMID SECONDS.  Prints the number of writes done.
"""

import sys
import time

from xenstored.guest import Guest


def main() -> int:
    domid, seconds = int(sys.argv[1]), float(sys.argv[2])
    n = 0
    with Guest(domid, timeout=10.0) as g:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            g.write(f"flood/k{n % 20}", str(n))
            n += 1
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
