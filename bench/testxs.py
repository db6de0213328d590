"""Xen's own ``test-xenstore``, fetched from Debian's ``xen-utils-4.17`` on first use.

The package is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache
folder (``$XS_BENCH_CACHE``, default ``~/.cache/xenstored-bench``); nothing is installed.  If the
system lacks ``libxenstore.so.4`` the library packages are unpacked beside it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

PACKAGE = "xen-utils-4.17"
LIB_PACKAGES = ("libxenstore4", "libxentoolcore1")
REL = "usr/lib/xen-4.17/bin/test-xenstore"
LINE = re.compile(r"^(?P<name>.+?)\s*:\s*avg:\s*(?P<ns>\d+) ns")


def cache_dir() -> str:
    d = os.environ.get("XS_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xenstored-bench")
    os.makedirs(d, exist_ok=True)
    return d


def _unpack(pkg: str, cache: str) -> None:
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    if not glob.glob(os.path.join(debs, f"{pkg}_*.deb")):
        subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True, capture_output=True)
    (deb,) = glob.glob(os.path.join(debs, f"{pkg}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(cache, "root")], check=True)


def _have_libxenstore() -> bool:
    out = subprocess.run(["ldconfig", "-p"], check=False, capture_output=True, text=True).stdout
    return "libxenstore.so.4 " in out


def binary() -> tuple[str, dict[str, str]]:
    """The test-xenstore path and the environment it needs."""
    cache = cache_dir()
    root = os.path.join(cache, "root")
    exe = os.path.join(root, REL)
    if not os.path.exists(exe):
        _unpack(PACKAGE, cache)
    env = dict(os.environ)
    if not _have_libxenstore():
        libdir = os.path.join(root, "usr/lib/x86_64-linux-gnu")
        if not glob.glob(os.path.join(libdir, "libxenstore.so.4*")):
            for pkg in LIB_PACKAGES:
                _unpack(pkg, cache)
        env["LD_LIBRARY_PATH"] = libdir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return exe, env


def parse(text: str) -> dict[str, float]:
    """``read 1    : avg: 40745 ns (...)`` lines -> {"read_1": 40745.0, ...}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            out[re.sub(r"\W+", "_", m["name"].strip())] = float(m["ns"])
    return out


def run(socket_path: str, iterations: int) -> dict[str, float]:
    exe, env = binary()
    env["XENSTORED_PATH"] = socket_path
    p = subprocess.run([exe, "-i", str(iterations)], env=env, check=False, capture_output=True, text=True,
                       timeout=600)
    cases = parse(p.stdout + p.stderr)
    if p.returncode != 0 or not cases:
        raise RuntimeError(f"test-xenstore failed ({p.returncode}): {(p.stdout + p.stderr)[-2000:]}")
    return cases
