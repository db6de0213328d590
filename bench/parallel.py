"""Run client workers in separate processes (one Python client process is often the bottleneck).

Each worker does its setup, waits on a shared barrier so that all start together, and returns a
dict that includes ``t0``/``t1`` (``time.perf_counter``, CLOCK_MONOTONIC: comparable across
processes).  The span of a parallel phase is ``max(t1) - min(t0)``.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any

Worker = Callable[[Any, Callable[[], None]], dict[str, Any]]


def _run(target: Worker, arg: Any, barrier: Any, q: Any, i: int) -> None:
    try:
        r = target(arg, barrier.wait)
        q.put((i, None, r))
    except BaseException:  # noqa: BLE001 - reported to the parent
        barrier.abort()
        q.put((i, traceback.format_exc(), None))


def run_workers(target: Worker, args: list[Any], timeout: float = 600.0) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(args))
    q = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(target, a, barrier, q, i), daemon=True) for i, a in enumerate(args)]
    for p in procs:
        p.start()
    results: list[dict[str, Any] | None] = [None] * len(args)
    errors: list[str] = []
    try:
        for _ in args:
            i, err, r = q.get(timeout=timeout)
            if err:
                errors.append(err)
            results[i] = r
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("worker failed:\n" + errors[0])
    return [r for r in results if r is not None]


def span(results: list[dict[str, Any]]) -> float:
    return max(r["t1"] for r in results) - min(r["t0"] for r in results)
