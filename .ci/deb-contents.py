#!/usr/bin/python3
"""Check what the built .deb contains, so a packaging change cannot drop or misplace a file.

The expectations are the layout debian/README.Debian explains: the daemon as
/usr/sbin/xenstored-py (never /usr/sbin/xenstored, which is xen-utils-common's), every module of
the source tree under dist-packages, the config as a conffile, the unit under its own name and
disabled, man pages, Debian's trio and sortedcontainers as dependencies.

Usage: .ci/deb-contents.py PACKAGE.deb [XEN.deb...]   (exit 1 listing every problem found)
With Xen's packages given too (xen-utils-common, xen-utils-4.17, xenstore-utils), also check
that no file of ours is one of theirs: dpkg would refuse to install both.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = "usr/lib/python3/dist-packages"

EXPECTED = {
    # path: mode (None: any; a directory's entries are checked through the files in it)
    "usr/sbin/xenstored-py": 0o755,
    "usr/sbin/xenstored-py-supervise": 0o755,
    "usr/bin/xenstore-guest": 0o755,
    "etc/xen/xenstored.conf": 0o644,
    "lib/systemd/system/xenstored-py.service": 0o644,
    "usr/share/xenstored-py/xenstored.service.d/python-xenstored.conf": 0o644,
    "usr/share/man/man8/xenstored-py.8.gz": 0o644,
    "usr/share/man/man5/xenstored.conf.5.gz": 0o644,
    "usr/share/man/man1/xenstore-guest.1.gz": 0o644,
    "usr/share/doc/xenstored-py/README.Debian": 0o644,
    "usr/share/doc/xenstored-py/copyright": 0o644,
    "usr/share/doc/xenstored-py/changelog.gz": 0o644,
}
# Xen's names (xen-utils-common owns /usr/sbin/xenstored) and places a package must leave alone.
FORBIDDEN = {"usr/sbin/xenstored", "usr/bin/xenstored"}
FORBIDDEN_PREFIXES = (
    "usr/local/",
    "lib/systemd/system/xenstored.service",
    "usr/lib/systemd/system/xenstored.service",
    "etc/systemd/",
    "etc/default/",
    "etc/init.d/",
    f"{SITE}/tests",
    f"{SITE}/bench",
)


class Deb:
    """The data archive of a .deb, read once: member names (without './') and file texts."""

    def __init__(self, path: str) -> None:
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", path], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            self.members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
            self.texts = {
                name: tar.extractfile(m).read().decode(errors="replace")  # type: ignore[union-attr]
                for name, m in self.members.items()
                if m.isfile() and not name.endswith(".gz")
            }


def field(deb: str, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True
    ).stdout.strip()


def check(deb: str) -> list[str]:
    problems: list[str] = []
    d = Deb(deb)
    files = d.members
    for path, mode in EXPECTED.items():
        m = files.get(path)
        if m is None:
            problems.append(f"missing {path}")
        elif mode is not None and m.mode & 0o7777 != mode:
            problems.append(f"{path} has mode {m.mode & 0o7777:o}, want {mode:o}")
    for path in files:
        if path in FORBIDDEN or path.startswith(FORBIDDEN_PREFIXES):
            problems.append(f"ships {path}, which is not ours to ship")
        if "__pycache__" in path or path.endswith(".pyc"):
            problems.append(f"ships byte code {path} (dh_python3 compiles at install)")
    # Every module of the source tree, so a new subpackage cannot be left out of the wheel.
    for src in sorted((ROOT / "xenstored").rglob("*.py")):
        rel = f"{SITE}/{src.relative_to(ROOT)}"
        if rel not in files:
            problems.append(f"missing module {rel}")
    for script in ("usr/sbin/xenstored-py", "usr/bin/xenstore-guest"):
        if script in files and not d.texts[script].startswith("#!/usr/bin/python3\n"):
            problems.append(f"{script} does not run with Debian's /usr/bin/python3")
    for unit in (
        "lib/systemd/system/xenstored-py.service",
        "usr/share/xenstored-py/xenstored.service.d/python-xenstored.conf",
    ):
        if unit in files:
            text = d.texts[unit]
            if "ExecStart=/usr/sbin/xenstored-py " not in text or "/usr/local" in text:
                problems.append(f"{unit} does not start /usr/sbin/xenstored-py")
    if (
        "etc/xen/xenstored.conf" in files
        and d.texts["etc/xen/xenstored.conf"] != (ROOT / "conf" / "xenstored.conf").read_text()
    ):
        problems.append("etc/xen/xenstored.conf differs from conf/xenstored.conf")
    conffiles = subprocess.run(
        ["dpkg-deb", "--info", deb, "conffiles"], capture_output=True, text=True, check=False
    ).stdout.split()
    if conffiles != ["/etc/xen/xenstored.conf"]:
        problems.append(f"conffiles are {conffiles}, want ['/etc/xen/xenstored.conf']")
    postinst = subprocess.run(
        ["dpkg-deb", "--info", deb, "postinst"], capture_output=True, text=True, check=False
    ).stdout
    if "deb-systemd-invoke" in postinst or "enable xenstored" in postinst:
        problems.append("postinst enables or starts a unit: installing must not start a XenStore")
    if field(deb, "Architecture") != "all":
        problems.append(f"Architecture is {field(deb, 'Architecture')}, want all")
    depends = field(deb, "Depends")
    for dep in ("python3-trio", "python3-sortedcontainers", "python3:any"):
        if dep not in depends:
            problems.append(f"Depends lacks {dep}: {depends}")
    return problems


def overlaps(ours: Deb, others: list[str]) -> list[str]:
    """Files (not directories) that ours shares with another package."""
    mine = {name for name, m in ours.members.items() if not m.isdir()}
    problems = []
    for other in others:
        shared = mine & {name for name, m in Deb(other).members.items() if not m.isdir()}
        problems += [f"{name} is also in {Path(other).name}" for name in sorted(shared)]
    return problems


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    problems = check(sys.argv[1]) + overlaps(Deb(sys.argv[1]), sys.argv[2:])
    for p in problems:
        print(f"deb-contents: {p}", file=sys.stderr)
    if not problems:
        n = len(Deb(sys.argv[1]).members)
        against = f", no file shared with {len(sys.argv) - 2} Xen packages" if sys.argv[2:] else ""
        print(f"deb-contents: {sys.argv[1]}: {n} entries, layout as expected{against}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
