"""Misbehaving guests, each a separate process attacking over its own ring.

Usage: hostile.py DOMID KIND.  KIND: corrupt-index, oversized, flood-no-read, garbage.
"""

import sys
import time

from xenstored.guest import Guest
from xenstored.wire import HEADER, Op, encode


def main() -> int:
    domid, kind = int(sys.argv[1]), sys.argv[2]
    g = Guest(domid, timeout=5.0)
    words = g.ring._words  # the raw page, as a malicious kernel would poke it
    if kind == "corrupt-index":
        words[2052 // 4] = (words[2048 // 4] + 5000) & 0xFFFFFFFF  # req_prod far beyond req_cons
        g.kick()
    elif kind == "oversized":
        g.send_raw(HEADER.pack(Op.WRITE, 1, 0, 100000))
        g.kick()
    elif kind == "flood-no-read":
        # Fill the request ring again and again without ever consuming a reply.
        req = encode(Op.READ, 7, 0, b"data/x\0")
        sent = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            n = g.ring.write(req)
            if n == len(req):
                sent += 1
                g.kick()
            else:
                if n:
                    g.kick()
                time.sleep(0.01)
        print(sent)
    elif kind == "garbage":
        # Well framed nonsense: every request must get an error reply, and the ring keeps working.
        import random

        rnd = random.Random(domid)
        for i in range(200):
            payload = bytes(rnd.randrange(256) for _ in range(rnd.randrange(60)))
            g.send_raw(encode(rnd.randrange(40), 10000 + i, rnd.choice([0, 0, 1, 99]), payload))
        g.write("data/alive", "yes")
        print(g.read("data/alive").decode())
    time.sleep(0.3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
