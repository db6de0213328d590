"""Metrics: what an operator of a host with hundreds of guests needs to see, with no new daemon.

Counters live in one :class:`Metrics` object that the daemon state owns (``core.metrics``); the
dispatcher adds one to a histogram bucket per request and a dict entry per error, the rest
only on rarer events (transaction ends; quota refusals are counted by ``quota.RefusalLog``).
Gauges (nodes, memory, watches, queued output per domain, connections, rings) are not kept at
all: :class:`State` is read from the daemon state when someone asks (``core.Core.metrics_state``),
which is O(domains + connections) and costs the hot path nothing.

Two renderings, both built here from the same table (:data:`METRICS`, which man/generate.py
also turns into xenstored(8)'s METRICS section, so the page cannot drift from the code):

* :func:`prometheus`: the Prometheus text exposition format (version 0.0.4), written to a file
  for node_exporter's textfile collector by the service;
* :func:`report`: ``xenstore-control stats [domid]``, short text that fits one reply (4 KiB).

Latency is a fixed log-bucket histogram per operation: 4 buckets per power of two of
nanoseconds (256 buckets cover any 64-bit duration), so recording is O(1) with no allocation and
a percentile read back is within its bucket: less than 25 % off (interpolated, usually far less).

Label values come from fixed sets (domain ids, op names, the 16 error names, quota names), so
none needs escaping.  Standard library only: the format is a few lines of text, and the daemon's
runtime dependencies stay trio and sortedcontainers (prometheus_client would bring its own
registry and locks into a hot path that must stay two clock reads and a list increment).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .wire import ERRORS, Op

NOPS = 32  # op codes are 0..26; every unknown code is counted as UNKNOWN_OP
UNKNOWN_OP = NOPS - 1
BUCKETS = 256  # 4 per bit of a 64-bit nanosecond count
QUANTILES = (0.5, 0.9, 0.99)
# Error counts are keyed domid << 4 | index of the name: an int key costs half a tuple's.
ERROR_INDEX: dict[str, int] = {name: i for i, name in enumerate(ERRORS)}
assert len(ERRORS) <= 16


def op_label(op: int) -> str:
    if op == UNKNOWN_OP:
        return "unknown"
    try:
        return Op(op).name
    except ValueError:
        return f"OP{op}"


# ----------------------------------------------------------------------------- histogram
def bucket_of(ns: int) -> int:
    """The bucket of a duration: values below 4 have their own; above, the bit length and the
    two bits below the leading one."""
    n = ns.bit_length()
    return n << 2 | (ns >> (n - 3) & 3) if n > 2 else ns


# What the dispatcher uses: bucket_of precomputed for durations below 4 ms in steps of 256 ns
# (exact from 1 us up, where every bucket is at least 256 ns wide; a request never takes less).
# One shift and one index cost half of bucket_of's arithmetic, on every request.
TABLE_SHIFT = 8
TABLE_LIMIT = 1 << 22


def _bucket_table() -> list[int]:
    """BUCKET_TABLE, built run by run (a bucket spans many steps): calling bucket_of for each
    of its 16384 entries took 3 ms of every start."""
    table: list[int] = []
    size = TABLE_LIMIT >> TABLE_SHIFT
    i = 0
    while i < size:
        ns = i << TABLE_SHIFT
        n = ns.bit_length()
        # The first duration of the next bucket: buckets of bit length n are 2**(n-3) wide.
        nxt = ((ns >> (n - 3)) + 1) << (n - 3) if n > 2 else ns + 1
        j = min(size, max(i + 1, -(-nxt >> TABLE_SHIFT)))
        table += [bucket_of(ns)] * (j - i)
        i = j
    return table


BUCKET_TABLE: list[int] = _bucket_table()


def bucket(ns: int) -> int:
    """The bucket the dispatcher counts a duration in (ops.dispatch inlines this)."""
    return BUCKET_TABLE[ns >> TABLE_SHIFT] if ns < TABLE_LIMIT else bucket_of(ns)


def estimated_sum(counts: list[int]) -> float:
    """Nanoseconds of all requests in a histogram, each taken at its bucket's middle: an exact
    sum would cost every request another big-integer addition (a quarter of what the metrics
    cost it), and the mean it gives (rate(_sum) / rate(_count)) is off by 12 % at worst (every
    request at a bucket's edge), a few percent for a spread of durations."""
    total = 0.0
    for i, c in enumerate(counts):
        if c:
            low, high = bucket_bounds(i)
            total += c * (low + high) / 2
    return total


def bucket_bounds(i: int) -> tuple[int, int]:
    """[low, high) nanoseconds of bucket ``i``."""
    if i < 4:
        return i, i + 1
    shift = (i >> 2) - 3
    frac = i & 3
    return (4 + frac) << shift, (5 + frac) << shift


def percentile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) in nanoseconds of a bucket histogram, interpolated linearly
    inside its bucket (as Prometheus' histogram_quantile); None for an empty histogram."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    cum = 0
    for i, c in enumerate(counts):
        if not c:
            continue
        if cum + c >= rank:
            low, high = bucket_bounds(i)
            return low + (high - low) * max(rank - cum, 0) / c
        cum += c
    raise AssertionError("unreachable: rank <= total")


# ----------------------------------------------------------------------------- counters
class Metrics:
    """The daemon's counters since it started (a live update or a restart starts them again,
    which Prometheus' rate() expects of a counter; ``xenstored_start_time_seconds`` says when).

    Per request, ops.dispatch adds one to a bucket of its op's histogram in :attr:`latency`
    (which also counts requests per op) and counts an error in :attr:`errors`; requests per
    domain are the connections' own counts (``Connection.requests``), so the hot path pays no
    dict for them."""

    def __init__(self) -> None:
        self.started = time.time()
        self.latency: list[list[int]] = [[0] * BUCKETS for _ in range(NOPS)]  # op -> bucket counts
        self.errors: dict[int, int] = {}  # domid << 4 | ERROR_INDEX[name] -> answered with it
        self.closed_requests: dict[int, int] = {}  # domid -> requests of its closed connections
        self.conflicts: dict[int, int] = {}  # domid -> TRANSACTION_END answered EAGAIN (conflict)
        self.lost: dict[int, int] = {}  # domid -> EAGAIN for a transaction a restart lost
        self.committed: dict[int, int] = {}  # domid -> transactions committed

    def observe(self, op: int, ns: int) -> None:
        """One request of ``op`` took ``ns``: what ops.dispatch does inline."""
        self.latency[op][bucket(ns)] += 1

    def error(self, domid: int, name: str) -> None:
        """One request answered with error ``name`` (what ops.dispatch does inline)."""
        k = domid << 4 | ERROR_INDEX[name]
        self.errors[k] = self.errors.get(k, 0) + 1

    def error_counts(self) -> dict[tuple[int, str], int]:
        """(domid, error name) -> requests answered with it."""
        return {(k >> 4, ERRORS[k & 15]): n for k, n in self.errors.items()}

    def conflict(self, domid: int) -> None:
        self.conflicts[domid] = self.conflicts.get(domid, 0) + 1

    def lost_transaction(self, domid: int) -> None:
        self.lost[domid] = self.lost.get(domid, 0) + 1

    def commit(self, domid: int) -> None:
        self.committed[domid] = self.committed.get(domid, 0) + 1

    def connection_closed(self, domid: int, requests: int) -> None:
        """A connection's requests outlive it in its domain's count."""
        if requests:
            self.closed_requests[domid] = self.closed_requests.get(domid, 0) + requests

    def forget(self, domid: int) -> None:
        """A domain is gone: its series end, so guests coming and going over months do not
        grow the daemon (domain ids are reused, and a new guest starts from zero)."""
        for i in range(len(ERRORS)):
            self.errors.pop(domid << 4 | i, None)
        for d in (self.closed_requests, self.conflicts, self.lost, self.committed):
            d.pop(domid, None)

    def latency_copy(self) -> list[list[int]]:
        return [list(h) for h in self.latency]


# ----------------------------------------------------------------------------- gauges
@dataclass
class DomainState:
    """What one domain holds in the daemon right now (socket clients count for the privileged
    domain they act for)."""

    requests: int = 0  # counter: requests of its connections, open and closed
    nodes: int = 0
    memory: int = 0
    watches: int = 0
    transactions: int = 0
    queued_bytes: int = 0
    queued_events: int = 0


@dataclass
class State:
    """The gauges, read from the daemon state at the moment of an exposition."""

    domains: dict[int, DomainState] = field(default_factory=dict)
    refusals: dict[tuple[int, str], int] = field(default_factory=dict)  # (domid, quota) -> refused
    socket_connections: int = 0
    ring_connections: int = 0
    rings: int = 0


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class MetricDef:
    name: str
    type: str  # counter, gauge, summary
    labels: tuple[str, ...]
    help: str


METRICS: tuple[MetricDef, ...] = (
    MetricDef("xenstored_start_time_seconds", "gauge", (), "When the counters started (Unix time): the daemon's start, restart or live update."),
    MetricDef("xenstored_requests_total", "counter", ("domid",), "Requests received, per domain (socket clients count for the privileged domain); per operation, see xenstored_request_duration_seconds_count."),
    MetricDef("xenstored_errors_total", "counter", ("domid", "error"), "Requests answered with an error, per domain and error name (ENOENT, EACCES, EAGAIN...)."),
    MetricDef("xenstored_quota_refusals_total", "counter", ("domid", "quota"), "Requests refused (ENOSPC) or watch events dropped by a quota, per domain and quota name."),
    MetricDef("xenstored_transactions_committed_total", "counter", ("domid",), "Transactions committed, per domain."),
    MetricDef("xenstored_transaction_conflicts_total", "counter", ("domid",), "Transaction commits answered EAGAIN because something they read changed, per domain."),
    MetricDef("xenstored_transactions_lost_total", "counter", ("domid",), "Requests answered EAGAIN because their transaction was open when a previous daemon process died, per domain."),
    MetricDef("xenstored_request_duration_seconds", "summary", ("op", "quantile"), "Time the daemon spent on a request, per operation: quantiles over the requests since the previous write of the file (NaN if none); _count (requests per operation) and _sum (estimated from the histogram: within 12 %) since the start."),
    MetricDef("xenstored_nodes", "gauge", ("domid",), "Nodes owned, per domain (the nodes quota counts these)."),
    MetricDef("xenstored_memory_bytes", "gauge", ("domid",), "Bytes charged to a domain: its nodes, watches, queued output and open transactions (the memory quota counts these)."),
    MetricDef("xenstored_watches", "gauge", ("domid",), "Watches registered, per domain."),
    MetricDef("xenstored_transactions_open", "gauge", ("domid",), "Transactions open, per domain."),
    MetricDef("xenstored_queued_output_bytes", "gauge", ("domid",), "Replies and watch events queued and not yet taken by the client, in bytes, per domain."),
    MetricDef("xenstored_queued_watch_events", "gauge", ("domid",), "Watch events queued for an unprivileged domain and not yet read (they expire after watch-event-timeout)."),
    MetricDef("xenstored_connections", "gauge", ("kind",), "Connections open: kind socket (dom0 clients) or ring (guest domains)."),
    MetricDef("xenstored_rings", "gauge", (), "Domains whose ring page is mapped (introduced and served)."),
    MetricDef("xenstored_domains", "gauge", (), "Domains the daemon keeps a record of."),
)  # fmt: skip
_BY_NAME = {m.name: m for m in METRICS}


# ----------------------------------------------------------------------------- Prometheus
def _num(v: float) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return repr(round(v, 9))  # nanoseconds in seconds, without binary float tails
    return str(v)


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str) -> None:
        m = _BY_NAME[name]
        self.lines.append(f"# HELP {name} {m.help}")
        self.lines.append(f"# TYPE {name} {m.type}")

    def sample(self, name: str, value: float, **labels: object) -> None:
        if labels:
            inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_num(value)}")
        else:
            self.lines.append(f"{name} {_num(value)}")


def prometheus(m: Metrics, state: State, since: list[list[int]] | None = None) -> str:
    """The text exposition of every metric.  ``since`` is the latency histogram at the previous
    exposition (:meth:`Metrics.latency_copy`): quantiles are of the requests after it, which is
    what an operator graphs (a lifetime p99 of a months-old daemon would never move)."""
    out = _Exposition()
    out.family("xenstored_start_time_seconds")
    out.sample("xenstored_start_time_seconds", round(m.started, 3))

    doms = sorted(state.domains.items())
    out.family("xenstored_requests_total")
    for domid, d in doms:
        out.sample("xenstored_requests_total", d.requests, domid=domid)
    out.family("xenstored_errors_total")
    for (domid, err), n in sorted(m.error_counts().items()):
        out.sample("xenstored_errors_total", n, domid=domid, error=err)
    out.family("xenstored_quota_refusals_total")
    for (domid, q), n in sorted(state.refusals.items()):
        out.sample("xenstored_quota_refusals_total", n, domid=domid, quota=q)
    for name, counts in (
        ("xenstored_transactions_committed_total", m.committed),
        ("xenstored_transaction_conflicts_total", m.conflicts),
        ("xenstored_transactions_lost_total", m.lost),
    ):
        out.family(name)
        for domid, n in sorted(counts.items()):
            out.sample(name, n, domid=domid)

    name = "xenstored_request_duration_seconds"
    out.family(name)
    for op in range(NOPS):
        hist = m.latency[op]
        count = sum(hist)
        if not count:
            continue
        window = hist if since is None else [a - b for a, b in zip(hist, since[op], strict=True)]
        label = op_label(op)
        for q in QUANTILES:
            v = percentile(window, q)
            out.sample(name, math.nan if v is None else v / 1e9, op=label, quantile=q)
        out.sample(name + "_sum", estimated_sum(hist) / 1e9, op=label)
        out.sample(name + "_count", count, op=label)

    for name, attr in (
        ("xenstored_nodes", "nodes"),
        ("xenstored_memory_bytes", "memory"),
        ("xenstored_watches", "watches"),
        ("xenstored_transactions_open", "transactions"),
        ("xenstored_queued_output_bytes", "queued_bytes"),
        ("xenstored_queued_watch_events", "queued_events"),
    ):
        out.family(name)
        for domid, d in doms:
            out.sample(name, getattr(d, attr), domid=domid)
    out.family("xenstored_connections")
    out.sample("xenstored_connections", state.socket_connections, kind="socket")
    out.sample("xenstored_connections", state.ring_connections, kind="ring")
    out.family("xenstored_rings")
    out.sample("xenstored_rings", state.rings)
    out.family("xenstored_domains")
    out.sample("xenstored_domains", len(state.domains))
    return "\n".join(out.lines) + "\n"


# ----------------------------------------------------------------------------- stats text
def _us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f}"


def _fit(lines: list[str], budget: int) -> str:
    """Join lines, cut at a line boundary to fit one reply, saying so."""
    text = ""
    for i, line in enumerate(lines):
        if len(text) + len(line) + 1 > budget - 40:
            return text + f"... {len(lines) - i} more lines\n"
        text += line + "\n"
    return text


def report(m: Metrics, state: State, domid: int | None = None, budget: int = 4000) -> str:
    """``xenstore-control stats [domid]``: the whole daemon (latency per operation since the
    start, the busiest domains), or one domain in full."""
    if domid is not None:
        return _fit(_domain_report(m, state, domid), budget)
    per_dom = {d: s.requests for d, s in state.domains.items()}
    err_dom: dict[int, int] = {}
    for (d, _), n in m.error_counts().items():
        err_dom[d] = err_dom.get(d, 0) + n
    ref_dom: dict[int, int] = {}
    for (d, _), n in state.refusals.items():
        ref_dom[d] = ref_dom.get(d, 0) + n
    lines = [
        (
            f"uptime {time.time() - m.started:.0f} s, {len(state.domains)} domains, {state.rings} rings, "
            f"connections: {state.socket_connections} socket, {state.ring_connections} ring"
        ),
        (
            f"requests {sum(per_dom.values())}, errors {sum(err_dom.values())}, "
            f"quota refusals {sum(ref_dom.values())}, commits {sum(m.committed.values())}, "
            f"EAGAIN: {sum(m.conflicts.values())} conflicts, {sum(m.lost.values())} lost in a restart"
        ),
        "",
        f"{'latency (us)':<22}{'count':>10}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    for op in range(NOPS):
        hist = m.latency[op]
        count = sum(hist)
        if count:
            p = [_us(percentile(hist, q)) for q in QUANTILES]
            lines.append(f"{op_label(op):<22}{count:>10}{p[0]:>9}{p[1]:>9}{p[2]:>9}")
    heads = (("domid", 6), ("requests", 10), ("errors", 8), ("refused", 8), ("nodes", 7), ("memory", 9))
    heads += (("watches", 8), ("txns", 5), ("queued", 8), ("events", 7))
    lines += ["", "".join(f"{h:>{w}}" for h, w in heads)]
    # Busiest first: with hundreds of guests the rest are behind "stats <domid>".
    order = sorted(state.domains, key=lambda d: (-per_dom.get(d, 0), d))
    for d in order:
        s = state.domains[d]
        lines.append(
            f"{d:>6}{per_dom.get(d, 0):>10}{err_dom.get(d, 0):>8}{ref_dom.get(d, 0):>8}{s.nodes:>7}{s.memory:>9}"
            f"{s.watches:>8}{s.transactions:>5}{s.queued_bytes:>8}{s.queued_events:>7}"
        )
    return _fit(lines, budget)


def _domain_report(m: Metrics, state: State, domid: int) -> list[str]:
    s = state.domains[domid]
    lines = [
        f"domain {domid}: {s.requests} requests",
        f"nodes {s.nodes}, memory {s.memory} bytes, watches {s.watches}, transactions open {s.transactions}",
        f"queued output {s.queued_bytes} bytes, queued watch events {s.queued_events}",
        (
            f"transactions: {m.committed.get(domid, 0)} committed, {m.conflicts.get(domid, 0)} conflicts "
            f"(EAGAIN), {m.lost.get(domid, 0)} lost in a restart (EAGAIN)"
        ),
    ]
    errs = sorted((e, n) for (d, e), n in m.error_counts().items() if d == domid)
    lines.append("errors: " + (" ".join(f"{e}={n}" for e, n in errs) or "none"))
    refs = sorted((q, n) for (d, q), n in state.refusals.items() if d == domid)
    lines.append("quota refusals: " + (" ".join(f"{q}={n}" for q, n in refs) or "none"))
    return lines
