"""``python -m bench``: the performance suite, optionally side by side with another daemon.

    python -m bench --quick                        # ours only, under a minute
    python -m bench                                # full: more rounds and samples, under 10 minutes
    python -m bench --against-cmd 'start-other-daemon {rundir}' --label C   # A B A B against another
    python -m bench --against /path/to/socket      # against a daemon that is already running
    python -m bench --only pipelined,idle --rounds 5 --json out.json --markdown out.md

Each workload runs ``--rounds`` rounds; with a second daemon the rounds alternate A B A B and
each figure is the median over the rounds, followed by the ratio of medians (ours / theirs).
"""

from __future__ import annotations

import sys

from .suite import main

sys.exit(main())
