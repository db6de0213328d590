#!/usr/bin/env python3
"""Boot real Xen 4.17 under QEMU TCG and check our daemon as dom0's system XenStore.

    python3 tests/xen/xenvm.py [--guests pv,pvh] [--daemon ours|c] [--timeout 300]

First use fetches Debian packages (``apt-get download`` + ``dpkg-deb -x``) into
``$XS_XENVM_CACHE`` (default ``~/.cache/xenstored-xenvm``) and installs ``qemu-system-x86`` with
``apt-get install`` if it is missing.  Each run builds a dom0 initramfs (busybox, Xen tools and
their libraries, the Xen kernel modules, ``dom0-init.sh``) and a guest initramfs (busybox,
xenstore-* tools, ``guest-init.sh``) in a temporary directory and boots
``qemu-system-x86_64 -accel tcg -smp 1`` under a hard timeout.  dom0 mounts the host's root
read-only over 9p and runs ``python3 -m xenstored -N`` from this checkout chrooted there, so the
host's interpreter and packages run unchanged.

Everything dom0 learns is printed on the serial console as ``XSVM ...`` lines; this script
timestamps each console line on arrival, prints one line per stage, a one-line verdict, and on
failure the console excerpts (Xen, dom0, the daemon's log, guest consoles) needed to diagnose it.
Exit status 0 on PASS, 1 on FAIL, 2 when the environment cannot run it at all, 3 when every
attempt was spoilt by a crash outside the daemon (see tests/xen/README.md, Reliability).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
XEN_VERSION = "4.17"

# Everything comes from Debian's package registry; the kernel is resolved from linux-image-amd64.
PACKAGES = [
    f"xen-hypervisor-{XEN_VERSION}-amd64",
    f"xen-utils-{XEN_VERSION}",
    "xenstore-utils",
    "busybox-static",
    f"libxenmisc{XEN_VERSION}",
    "libxencall1",
    "libxendevicemodel1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    "libxenstore4",
    "libxentoolcore1",
    "libxentoollog1",
    "libyajl2",
    # /etc/xen/scripts: the hotplug scripts libxl runs for disks and vifs (--devices)
    "xen-utils-common",
]
XEN_BIN = f"/usr/lib/xen-{XEN_VERSION}/bin"
DOM0_TOOLS = [
    f"{XEN_BIN}/xl",
    f"{XEN_BIN}/xen-init-dom0",
    f"{XEN_BIN}/xenstored",
    f"{XEN_BIN}/xenconsoled",
    f"{XEN_BIN}/xenstore-control",
]
XENSTORE_TOOLS = ["xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-list", "xenstore-rm",
                  "xenstore-exists", "xenstore-watch", "xenstore-chmod"]
MODULES = ["xen-evtchn", "xen-gntdev", "xen-privcmd", "xenfs", "9p", "9pnet_virtio", "virtio_pci"]
# --devices: dom0's backends (disk through a loop device, vif on a bridge) and the guest's frontends
DEVICE_MODULES = ["loop", "xen-blkback", "xen-netback", "bridge"]
GUEST_DEVICE_MODULES = ["xen-blkfront", "xen-netfront"]
# What the hotplug scripts run, from the host (GNU tools; they shadow busybox's applets because
# the scripts put /usr/bin and /usr/sbin first in PATH): bash for the scripts themselves, util-linux
# losetup/flock, coreutils stat/expr/readlink (`stat -c %t:%T`, `expr index`), iproute2 ip
# (`ip link set master`, `type bridge`).
HOTPLUG_TOOLS = {"/bin/bash": "bash", "/usr/sbin/losetup": "losetup", "/usr/bin/flock": "flock",
                 "/usr/bin/stat": "stat", "/usr/bin/expr": "expr", "/usr/bin/readlink": "readlink",
                 "/usr/sbin/ip": "ip"}
LOGGER = """#!/bin/sh
# logger for the hotplug scripts (no syslog in dom0): the message goes to stderr, which the
# scripts send to /var/log/xen/xen-hotplug.log
while [ $# -gt 0 ]; do case $1 in --) shift; break ;; -p|-t) shift 2 ;; -*) shift ;; *) break ;; esac; done
echo "$(date +%T) $*" >&2
"""
# The device run's stages, in the order they run (see tests/xen/README.md); CI runs DEVICE_CI.
DEVICE_STAGES = ["vbd-read", "vbd-write", "vif-ping", "crash-restart", "block-attach", "block-detach", "save", "restore",
                 "reboot", "network-detach", "shutdown"]
# What CI runs (within its time budget): the stages that matter most; README says how to run all.
DEVICE_CI = ["vbd-read", "vbd-write", "vif-ping", "crash-restart", "block-attach", "block-detach", "save", "restore",
             "shutdown"]
# Stages that need another one first (their own stage is skipped, and reported, without it).
DEVICE_NEEDS = {"block-detach": "block-attach", "restore": "save"}
LIBDIRS = ["usr/lib/x86_64-linux-gnu", f"usr/lib/xen-{XEN_VERSION}/lib/x86_64-linux-gnu"]

CPU = "max,smap=off"  # SMAP: QEMU TCG's emulation does not match what Xen expects (dom0 dies)
DEFAULT_CACHE = Path(os.environ.get("XS_XENVM_CACHE") or Path.home() / ".cache" / "xenstored-xenvm")


class EnvError(Exception):
    """The machine cannot run the check (no apt, no network, not root...)."""


def log(msg: str) -> None:
    print(f"xenvm: {msg}", flush=True)


# ----------------------------------------------------------------------------- fetching
def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def ensure_qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        return qemu
    if os.geteuid() != 0:
        raise EnvError("qemu-system-x86_64 missing: run `sudo apt-get install -y qemu-system-x86`")
    log("installing qemu-system-x86 with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"]
    if subprocess.run(cmd, check=False, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        _run(cmd, env=env, stdout=subprocess.DEVNULL)
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise EnvError("qemu-system-x86_64 still missing after apt-get install")
    return qemu


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True).stdout
    m = re.search(r"Depends: (linux-image-\S+-amd64)", out)
    if not m:
        raise EnvError("cannot resolve linux-image-amd64 with apt-cache")
    return m.group(1)


def fetch(cache: Path) -> Path:
    """Download and unpack the Debian packages once; returns the unpacked root."""
    root = cache / "root"
    wanted = "\n".join(PACKAGES) + "\n"
    # A cache filled for an older package list (before xen-utils-common was added) is refilled.
    if (root / ".complete").exists() and (root / ".wanted").exists() and (root / ".wanted").read_text() == wanted:
        return root
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise EnvError("needs Debian's apt-get and dpkg-deb")
    debs = cache / "debs"
    shutil.rmtree(root, ignore_errors=True)
    debs.mkdir(parents=True, exist_ok=True)
    try:
        pkgs = [_kernel_package(), *PACKAGES]
    except subprocess.CalledProcessError:
        pkgs = []
    log(f"downloading {len(pkgs) or '?'} Debian packages into {debs}")
    try:
        if not pkgs:
            raise subprocess.CalledProcessError(1, "apt-cache")
        _run(["apt-get", "download", "-q", *pkgs], cwd=debs, stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        if os.geteuid() != 0:
            raise EnvError("apt-get download failed (try `sudo apt-get update` first)") from None
        _run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
        pkgs = [_kernel_package(), *PACKAGES]
        _run(["apt-get", "download", "-q", *pkgs], cwd=debs, stdout=subprocess.DEVNULL)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    # An uncompressed guest kernel: libxc's xz decompression costs 8-10 s under TCG.
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    (root / "boot" / "vmlinux-guest").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
    xen_gz = root / "boot" / f"xen-{XEN_VERSION}-amd64.gz"
    (root / "boot" / "xen").write_bytes(gzip.decompress(xen_gz.read_bytes()))
    (root / ".wanted").write_text(wanted)
    (root / ".complete").write_text("\n".join(sorted(p.name for p in debs.glob("*.deb"))) + "\n")
    shutil.rmtree(debs)
    return root


def extract_vmlinux(bzimage: bytes) -> bytes:
    setup_sects = (bzimage[0x1F1] or 4) + 1
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[setup_sects * 512 + offset:][:length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    raise EnvError(f"unknown bzImage payload compression {payload[:6]!r}")


# ----------------------------------------------------------------------------- initramfs
class Cpio:
    """A newc cpio archive writer (what the kernel's initramfs unpacker reads); no cpio needed."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        parent = os.path.dirname(name)
        if parent and parent not in self.names:
            self.dir(parent)
        self.names.add(name)
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        self.ino += 1
        w = self.buf.write
        w(hdr.encode() + nb)
        w(b"\0" * (-(110 + len(nb)) % 4))
        w(data)
        w(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def copy(self, name: str, src: Path | str) -> None:
        st = os.stat(src)
        self.file(name, Path(src).read_bytes(), st.st_mode & 0o777)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def shared_libs(root: Path, binaries: list[Path]) -> dict[str, Path]:
    """soname -> file for everything the binaries load, preferring the unpacked packages, plus
    libgcc_s.so.1 (dlopen'ed by glibc for pthread_cancel: xl and xenstore-watch abort without)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(root / d) for d in LIBDIRS))
    libs: dict[str, Path] = {}
    for b in binaries:
        out = _run(["ldd", str(b)], capture_output=True, env=env).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\S+) => (/\S+)", line)
            if m:
                libs[m.group(1)] = Path(m.group(2))
            m = re.match(r"\s*(/\S*ld-linux\S*) \(", line)
            if m:
                libs["ld-linux"] = Path(m.group(1))
    for cand in ("/lib/x86_64-linux-gnu/libgcc_s.so.1", "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1"):
        if os.path.exists(cand):
            libs["libgcc_s.so.1"] = Path(cand)
            break
    return libs


def add_binaries(cpio: Cpio, root: Path, files: list[str]) -> None:
    paths = [root / f.lstrip("/") for f in files]
    for f, p in zip(files, paths):
        cpio.copy(f, p)
    for soname, src in shared_libs(root, paths).items():
        if soname == "ld-linux":
            cpio.copy("/lib64/ld-linux-x86-64.so.2", src)
        else:
            cpio.copy(f"/lib/x86_64-linux-gnu/{soname}", src)


def base_layout(cpio: Cpio, root: Path, init: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "var",
              "root", "lib/x86_64-linux-gnu", "lib64"):
        cpio.dir(d)
    cpio.symlink("usr/lib/x86_64-linux-gnu", "../../lib/x86_64-linux-gnu")
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.copy("bin/busybox", root / "bin/busybox")
    cpio.file("init", init.read_bytes(), 0o755)


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` field of a kernel module's .modinfo section (ELF64 little-endian)."""
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if ko[stroff + name:].split(b"\0", 1)[0] == b".modinfo":
            for field_ in ko[off:off + size].split(b"\0"):
                if field_.startswith(b"depends="):
                    return [d for d in field_[8:].decode().split(",") if d]
    return []


def module_load_order(root: Path, wanted: list[str]) -> list[Path]:
    moddir = next((root / "lib" / "modules").iterdir())
    index = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in index:  # built into the kernel
            return
        for dep in modinfo_depends(index[key].read_bytes()):
            visit(dep)
        order.append(index[key])

    for w in wanted:
        visit(w)
    return order


def add_modules(cpio: Cpio, root: Path, wanted: list[str]) -> None:
    """The modules and their dependencies, plus lib/modules/load.list in load order for /init."""
    mods = module_load_order(root, wanted)
    for m in mods:
        cpio.copy(f"lib/modules/{m.name}", m)
    cpio.file("lib/modules/load.list", "".join(f"{m.name}\n" for m in mods).encode())


def add_host_binaries(cpio: Cpio, tools: dict[str, str]) -> None:
    """Copy the host's own programs (destination -> name on the host's PATH) with their libraries."""
    paths: list[Path] = []
    for dest, name in tools.items():
        src = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if not src:
            raise EnvError(f"--devices needs {name} on the host (the hotplug scripts run it in dom0)")
        cpio.copy(dest, src)
        paths.append(Path(src))
    for soname, src in shared_libs(Path("/"), paths).items():
        if soname == "ld-linux":
            cpio.copy("/lib64/ld-linux-x86-64.so.2", src)
        else:
            cpio.copy(f"/lib/x86_64-linux-gnu/{soname}", src)


def disk_image(label: str, size: int) -> bytes:
    """Known content the guest checksums: every 512-byte sector names its disk and its number."""
    return b"".join(f"XSVM {label} sector {i:08d} ".encode().ljust(512, b".") for i in range(size // 512))


# The device run's disks: xvda from the start (read, written, kept across save/restore and reboot),
# xvdb hot-plugged read-only (block-attach).  Small, because they live in dom0's RAM.
DISKS = {"disk1": 4 << 20, "disk2": 1 << 20}


def build_guest_initramfs(root: Path, devices: bool = False) -> bytes:
    cpio = Cpio()
    base_layout(cpio, root, HERE / "guest-init.sh")
    add_binaries(cpio, root, [f"/usr/bin/{t}" for t in XENSTORE_TOOLS])
    if devices:
        add_modules(cpio, root, GUEST_DEVICE_MODULES)
    return cpio.finish()


def build_dom0_initramfs(root: Path, conf: dict[str, str], guests: list[str], devices: bool = False) -> bytes:
    cpio = Cpio()
    base_layout(cpio, root, HERE / "dom0-init.sh")
    # xl save/restore run libxc's stream code in a helper process
    tools = DOM0_TOOLS + ([f"{XEN_BIN}/libxl-save-helper"] if devices else [])
    add_binaries(cpio, root, tools + [f"/usr/bin/{t}" for t in XENSTORE_TOOLS])
    add_modules(cpio, root, MODULES + (DEVICE_MODULES if devices else []))
    conf = dict(conf, XSVM_GUESTS=" ".join(guests))
    if devices:
        # libxl runs the hotplug scripts from /etc/xen/scripts (XEN_SCRIPT_DIR) itself.
        scripts = root / "etc" / "xen" / "scripts"
        for f in sorted(scripts.iterdir()):
            cpio.copy(f"etc/xen/scripts/{f.name}", f)
        add_host_binaries(cpio, HOTPLUG_TOOLS)
        # No syslog in dom0: the scripts' log() lines go to their stderr, xen-hotplug.log.
        cpio.file("usr/bin/logger", LOGGER.encode(), 0o755)
        for name, size in DISKS.items():
            data = disk_image(name, size)
            cpio.file(f"var/lib/xsvm/{name}.img", data)
            conf[f"XSVM_{name.upper()}_SHA256"] = hashlib.sha256(data).hexdigest()
    cpio.file("etc/xsvm.conf", "".join(f"{k}='{v}'\n" for k, v in conf.items()).encode())
    cpio.file("guest.cpio", build_guest_initramfs(root, devices))
    return cpio.finish()


def install_from_deb(cache: Path) -> tuple[str, str]:
    """Build this checkout's Debian package (.ci/deb-build.sh), unpack it, and make sure Debian's
    own python3-trio and python3-sortedcontainers are installed, as the package depends: dom0
    then runs the daemon the way a Debian host installs it (Debian's /usr/bin/python3, the
    package's files), not the checkout.  Returns the interpreter and its PYTHONPATH."""
    out = cache / "deb"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    build = subprocess.run(["bash", str(REPO / ".ci" / "deb-build.sh"), str(out)], check=False,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    debs = sorted(out.glob("xenstored-py_*.deb"))
    if build.returncode != 0 or not debs:
        raise EnvError(f"cannot build the package: {build.stdout[-2000:]}")
    root = out / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    python = "/usr/bin/python3"
    probe = [python, "-I", "-c", "import trio, sortedcontainers"]
    if subprocess.run(probe, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "python3-trio",
                        "python3-sortedcontainers"], check=True, stdout=subprocess.DEVNULL)
    dist = root / "usr" / "lib" / "python3" / "dist-packages"
    subprocess.run([python, "-m", "compileall", "-q", str(dist)], check=False, stdout=subprocess.DEVNULL)
    log(f"daemon from the package: {debs[-1].name} on {python} (Debian's python3-trio)")
    return python, str(dist)


def precompile() -> None:
    """Byte-compile what dom0 imports: the share is read-only, and compiling there is slow."""
    dirs = [str(REPO / "xenstored")]
    for mod in ("trio", "sortedcontainers", "outcome", "sniffio", "attr", "attrs", "idna"):
        spec = importlib.util.find_spec(mod)
        if spec and spec.submodule_search_locations:
            dirs.extend(spec.submodule_search_locations)
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=False, stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- booting
@dataclass
class Line:
    t: float
    text: str


@dataclass
class Result:
    lines: list[Line] = field(default_factory=list)
    exit_code: int | None = None
    timed_out: bool = False
    elapsed: float = 0.0


def boot(qemu: str, root: Path, dom0_cpio: Path, timeout: float, console_log: Path,
         echo: bool = False) -> Result:
    xen = root / "boot" / "xen"
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    xen_args = ("console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 "
                "loglvl=all guest_loglvl=all smap=0 " + os.environ.get("XS_XENVM_XEN_ARGS", ""))
    cmd = [
        "timeout", "-k", "5", str(int(timeout) + 10),
        qemu, "-machine", "pc", "-accel", "tcg", "-cpu", os.environ.get("XS_XENVM_CPU") or CPU, "-m", "2048", "-smp", "1",
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-net", "none",
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,multidevs=remap,readonly=on",
        "-kernel", str(xen), "-append", xen_args,
        "-initrd", f"{vmlinuz} console=hvc0 earlyprintk=xen rdinit=/init loglevel=4,{dom0_cpio}",
    ]
    res = Result()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        with open(console_log, "w", buffering=1) as out:  # line-buffered: follow it with tail -f
            for raw in proc.stdout:
                t = time.monotonic() - start
                text = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
                res.lines.append(Line(t, text))
                out.write(f"[{t:7.2f}] {text}\n")
                if echo:
                    print(f"[{t:7.2f}] {text}", flush=True)
        done.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        while not done.wait(0.5):
            if any(ln.text.startswith("XSVM VERDICT") for ln in res.lines[-5:]):
                # dom0 powers off right after; give it a moment, then stop waiting for it.
                done.wait(20)
                break
            if time.monotonic() - start > timeout:
                res.timed_out = True
                break
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        res.exit_code = proc.wait()
        th.join(5)
    res.elapsed = time.monotonic() - start
    return res


# ----------------------------------------------------------------------------- reporting
MILESTONES = [
    ("xen", re.compile(r"\(XEN\) Xen version")),
    ("dom0-kernel", re.compile(r"Linux version \d")),
    ("dom0-init", re.compile(r"^XSVM INIT dom0")),
]
STAGE_RE = re.compile(r"^XSVM STAGE (\S+) (ok|FAIL) ?(.*?) t=([\d.]+)$")
VERDICT_RE = re.compile(r"^XSVM VERDICT (PASS|FAIL) ?(.*?) t=([\d.]+)$")


def report(res: Result, console_log: Path, guests: list[str], daemon: str,
           live_update: bool = False, devices: list[str] | None = None) -> tuple[bool, str]:
    rows: list[tuple[str, float, str, str]] = []
    for name, rx in MILESTONES:
        ln = next((ln for ln in res.lines if rx.search(ln.text)), None)
        if ln:
            rows.append((name, ln.t, "ok", ""))
    stages: dict[str, tuple[str, str]] = {}
    verdict = None
    for ln in res.lines:
        m = STAGE_RE.match(ln.text)
        if m:
            rows.append((m.group(1), ln.t, m.group(2), m.group(3)))
            stages[m.group(1)] = (m.group(2), m.group(3))
        m = VERDICT_RE.match(ln.text)
        if m:
            verdict = (m.group(1), m.group(2), ln.t)
    for ln in res.lines:  # XS_XENVM_PYTIME=1: python3's own start-up in dom0
        if ln.text.startswith("XSVM PYTIME "):
            print(f"xenvm: python3 in dom0: {ln.text[len('XSVM PYTIME '):]}")
        elif ln.text.startswith("XSVM GUEST-LOST "):  # the device guest stopped answering
            print(f"xenvm: guest lost at t={ln.t:6.1f}s: {ln.text[len('XSVM GUEST-LOST '):]}")
        elif ln.text.startswith("XSVM DAEMON-DIED "):  # dom0's watch on the daemon's process
            print(f"xenvm: daemon died at t={ln.t:6.1f}s: {ln.text[len('XSVM DAEMON-DIED '):]}")
            for cause in death_cause(res):
                print(f"xenvm: daemon died | {cause}")
        elif ln.text.startswith("XSVM NOTE "):  # facts a stage records without judging them
            print(f"xenvm: note at t={ln.t:6.1f}s: {ln.text[len('XSVM NOTE '):]}")
    prev = 0.0
    for name, t, status, detail in rows:
        print(f"xenvm: stage {name:<22} {status:<4} t={t:6.1f}s (+{t - prev:5.1f}s) {detail}")
        prev = t
    expected = ["xenstored", "dom0-early-ring", "xen-init-dom0", "dom0-xenbus"] + [f"{g}-{s}" for g in guests
                                                  for s in ("guest-up", "watch-roundtrip", "destroy")]
    if devices:
        # The device guest ends with the shutdown stage when it runs, else with xl destroy.
        expected = [s for s in expected if s != f"{guests[0]}-destroy" or "shutdown" not in devices] + devices
    if live_update:
        expected += ["live-update", "lu-socket", "lu-dom0-xenbus", "lu-guest-roundtrip"]
        if daemon == "ours":  # C cannot survive its own death: the crash stages are ours only
            expected += ["crash-restart", "cr-socket", "cr-dom0-xenbus", "cr-guest-roundtrip", "cr-xl-list"]
    missing = [s for s in expected if s not in stages]
    startup = stages.get("xenstored", ("", ""))[1]
    what = f"guests={','.join(guests)}" + (f" devices={','.join(devices)}" if devices else "")
    if verdict and verdict[0] == "PASS" and not missing:
        line = (f"XENVM PASS: daemon={daemon} {what} in {res.elapsed:.1f}s "
                f"(verdict at {verdict[2]:.1f}s; {startup})")
        return True, line
    if verdict:
        why = verdict[1] or f"missing stages {missing}"
    elif res.timed_out:
        why = f"no verdict within {res.elapsed:.0f}s (timeout); last stage: {rows[-1][0] if rows else 'none'}"
    else:
        why = f"QEMU exited ({res.exit_code}) without a verdict; last stage: {rows[-1][0] if rows else 'none'}"
    print_excerpts(res)
    return False, f"XENVM FAIL: daemon={daemon} {what}: {why} (console: {console_log})"


# Processes that crash for no reason of their own: under QEMU TCG (QEMU 7.2, Xen 4.17 PV dom0 on
# an emulated AMD CPU) a dom0 process occasionally faults on a wild pointer right after exec
# (seen in busybox's malloc and TLS accesses, once as an xl assertion), about once in 5-10 runs,
# always while a guest is running.  Such a run says nothing about the daemon; it is retried.
PLATFORM_RE = re.compile(
    r"segfault at [0-9a-f]+ ip|^Segmentation fault$|^Aborted$|^Illegal instruction$|"
    r"Assertion `.*' failed|^sh: bad number|general protection fault|^XSVM PLATFORM dom0-segfaults=[1-9]|"
    # the dynamic loader tripping over its own data (an assertion in dl-version.c, seen cut to
    # 100 characters in a guest's log line, which loses the "' failed" above)
    r"Inconsistency detected by ld\.so: |"
    # the guest's shell running a command whose name came out corrupt: guest-init.sh starts only
    # xenstore-watch there, and "xestore-watch: not found" was seen (the watcher then never sent
    # its WATCH: pv-guest-checks' no-initial-watch-event).  The real name missing stays a failure.
    r"^guest: a watcher said: /init: line \d+: (?!xenstore-watch:)\S+: not found|"
    # glibc's heap checks (seen from processes the hotplug scripts start)
    r"^(\S+ )?(free|malloc|realloc|double free or corruption|corrupted size)\b.*(\(\)|corrupt|invalid)|"
    r"^[^ ]+: line \d+: +\d+ (Segmentation fault|Aborted)|"
    r"^guest: \S+ \S+ killed by signal (4|6|7|11),|^XSVM PLATFORM .* killed by signal|"
    # Xen's own hotplug script, unchanged and run fine a moment before, failing to parse: its
    # text came back corrupt from the read-only 9p share (seen once, in block's `$(xenstore_read
    # "$XENBUS_PATH/params")`, after the same script had attached xvda)
    r"^/etc/xen/scripts/\S+: (command substitution: )?line \d+: "
    r"(unexpected EOF while looking for matching|syntax error)|"
    # dom0's /init (busybox's shell running dom0-init.sh) killed by SIGILL/SIGABRT/SIGBUS/SIGSEGV
    # (+0x80 with a core): dom0 panics at once, before any verdict or dump.  Seen with a general
    # protection fault in busybox's malloc (its unsorted bin's bk pointer read as "99999999"),
    # the same code and the same wild heap pointers as the other dom0 processes' crashes.
    r"Kernel panic - not syncing: Attempted to kill init! exitcode=0x000000[08][467b]$"
)

# The kernel's report of a user process killed by a fault (traps.c / fault.c), as dom0's dumps
# carry it: "[   22.064695] traps: python3[134] general protection fault ip:... in libpython...",
# "[   52.1] busybox[415]: segfault at 0 ip ... in busybox[...]".
KERNEL_FAULT_RE = re.compile(
    r"^\[\s*(\d+\.\d+)\] (?:traps: )?(\S+?)\[(\d+)\]:? "
    r"(general protection fault|segfault at|trap invalid opcode|trap stack segment|trap divide error)"
)
DAEMON_DIED_RE = re.compile(r"^XSVM DAEMON-DIED pid (\d+).* t=([\d.]+)$")
# faulthandler's first line (dom0 runs the daemon with PYTHONFAULTHANDLER=1).  Its handler makes
# the fault a handled one, so the kernel then logs no "segfault at" line for the daemon.
PY_FAULT_RE = re.compile(r"^Fatal Python error: (Segmentation fault|Bus error|Illegal instruction|"
                         r"Floating point exception|Aborted)")
# A thread's header in faulthandler's report: its id is pthread_self(), read through the thread's
# own TLS pointer (the FS segment base) when the thread started.
PY_THREAD_RE = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):")
# How close before the daemon's fault another process's fault must be for both to count as one
# corruption of the platform's memory: measured 0.04 s apart (see daemon_died_with_platform).
CORRUPTION_WINDOW = 2.0
# When only faulthandler tells of the daemon's fault, its time is dom0's DAEMON-DIED mark: dom0
# polls the daemon's process every 0.25 s, so the fault came at most this much before the mark.
DEATH_NOTICED_WITHIN = 0.5


def platform_crashes(res: Result) -> list[str]:
    """The crashes outside the daemon in this boot.  If the daemon itself died, none, unless
    daemon_died_with_platform() shows that another process had crashed the same way just
    before it: the daemon's own fault may be its own doing (it calls C through ctypes)."""
    if any(DAEMON_DIED_RE.match(ln.text) for ln in res.lines):
        return daemon_died_with_platform(res)
    return [ln.text for ln in res.lines if not ln.text.startswith("(XEN)") and PLATFORM_RE.search(ln.text)]


def daemon_died_with_platform(res: Result) -> list[str]:
    """The daemon died of a fault *and* another dom0 process had faulted at most
    CORRUPTION_WINDOW seconds before it: that pair, as one line; else nothing.

    Seen in the device run: busybox (pid 415) took a general protection fault in glibc's
    malloc (a wild unsorted-bin pointer, the platform's usual corruption, see README) and the
    daemon, 0.04 s later, one inside libpython.  A bug of the daemon can corrupt only its own
    memory (its ctypes calls and the ring pages it maps; another process's heap is out of its
    reach), and its death cannot cause a fault that came before it: such a pair is the
    platform's.  The daemon dying alone, of a fault or of an exception, is never retried.

    The daemon's fault is the kernel's line for its pid (kernel time) or, under faulthandler,
    which suppresses that line, faulthandler's report after the DAEMON-DIED mark (the fault
    then came between DEATH_NOTICED_WITHIN before the mark and the mark, dom0's uptime)."""
    died = [(m.group(1), float(m.group(2)), i) for i, ln in enumerate(res.lines) if (m := DAEMON_DIED_RE.match(ln.text))]
    if not died:
        return []
    pids = {pid for pid, _, _ in died}
    faults = [(float(m.group(1)), m.group(2), m.group(3), m.group(4), ln.text)
              for ln in res.lines if (m := KERNEL_FAULT_RE.match(ln.text))]
    others = [f for f in faults if f[2] not in pids]
    # (daemon pid, kind of fault, earliest and latest time it can have happened)
    daemon_faults = [(pid, kind, t, t) for t, _name, pid, kind, _ in faults if pid in pids]
    if not daemon_faults:
        pid, t_mark, i = died[0]
        py = next((m.group(1) for ln in res.lines[i:] if (m := PY_FAULT_RE.match(ln.text))), None)
        if py is not None:
            daemon_faults = [(pid, py.lower(), t_mark - DEATH_NOTICED_WITHIN, t_mark)]
    shared = shared_thread_id(res, died[0][2])
    if shared:
        note = (f"the daemon (pid {died[0][0]}) died of a fault in a thread whose id {shared} is another "
                f"thread's too (faulthandler's report): it ran on that thread's TLS, which no code of "
                f"the daemon can cause")
        return [note]
    where = interpreter_fault(res, died[0][2])
    if where:
        note = (f"the daemon (pid {died[0][0]}) died of a fault in interpreter code, {where}, with none of "
                f"its native work on the stack (the canary's kind of death)")
        return [note]
    for pid, kind, t_first, t_last in daemon_faults:
        before = [f for f in others if t_first - CORRUPTION_WINDOW <= f[0] <= t_last]
        if before:
            t_o, name, opid, okind, text = before[-1]
            when = (f"{t_last - t_o:.2f}s" if t_first == t_last
                    else f"at most {t_last - t_o:.2f}s (dom0 noticed at {t_last:.2f}s)")
            note = (f"the daemon (pid {pid}) died of a {kind} {when} after {name} (pid {opid}) "
                    f"took a {okind}: {text}")
            return [note]
    return []


# The daemon's modules that do native work: ctypes calls, ioctls, mapped ring and journal pages.
# A fault with one of them as the faulting thread's innermost frame may be the daemon's own bug.
NATIVE_FRAME_RE = re.compile(r'^\s*File ".*/xenstored/(hypervisor/\w+|journal|ring|ringpump)\.py", line \d+')
PY_FRAME_RE = re.compile(r'^\s*File "(.*)", line (\d+) in (\S+)')


def interpreter_fault(res: Result, start: int) -> str | None:
    """Where the daemon faulted ("<function> in <file>:<line>"), when faulthandler's first report
    after line ``start`` (the DAEMON-DIED mark) puts the fault in plain Python code, else None.

    The control (canary.py: the same interpreter doing dict and logging work, with no ctypes, no
    device and no mapping) died that way on this platform at about the rate the daemon did
    (README, The daemon's deaths): such a death says nothing about the daemon, and the boot is
    retried, once in CI (``--retries 1``), so that a daemon that faults on every boot still fails.
    Not retried: a death without faulthandler's report, an exception (no report either), a
    thread with no Python frame, or a fault under one of the daemon's native modules."""
    inside = current = False
    for ln in res.lines[start:]:
        if not inside:
            inside = bool(PY_FAULT_RE.match(ln.text))
            continue
        if ln.text.startswith(("== ", "XSVM", "(XEN)")):
            return None
        if ln.text.startswith("Current thread "):
            current = True
            continue
        if current:
            if NATIVE_FRAME_RE.match(ln.text):
                return None
            m = PY_FRAME_RE.match(ln.text)
            if m is None:
                return None  # "<no Python frame>", or a report cut short
            return f"{m.group(3)} in {'/'.join(m.group(1).split('/')[-2:])}:{m.group(2)}"
    return None


def shared_thread_id(res: Result, start: int) -> str | None:
    """A thread id that two threads share in the first faulthandler report after line ``start``
    (the DAEMON-DIED mark), or None.

    Seen once: the restarted daemon aborted in ``malloc(): corrupted top size`` while starting
    its journal thread, and the report listed that new thread and the main thread under one id.
    The id is pthread_self(), which a thread reads through its FS base; glibc gives each thread
    its own, through clone(), so two threads with one id mean the new thread ran on the main
    thread's TLS (its malloc state included): the FS-base confusion that also explains the
    platform's wild TLS and heap pointers in other processes (README, Reliability)."""
    ids: list[str] = []
    inside = False
    for ln in res.lines[start:]:
        if PY_FAULT_RE.match(ln.text):
            if inside:
                break  # a second report: only the first one counts
            inside = True
        elif inside and (ln.text.startswith(("== ", "XSVM")) or ln.text.startswith("(XEN)")):
            break
        elif inside and (m := PY_THREAD_RE.match(ln.text)):
            if m.group(1) in ids:
                return m.group(1)
            ids.append(m.group(1))
    return None


# What the summary repeats of dom0's daemon-died dump (dom0-init.sh's daemon_watch): CI's report of
# a failure keeps the summary lines but may cut the dumps, and a death whose cause is cut cannot be
# told from the platform's (seen: CI showed "the daemon (pid 563) died" and nothing of why).
DEATH_LOG_LINES = 12    # faulthandler's first line and innermost frames, or the log's last lines
DEATH_KERNEL_LINES = 4  # the kernel's lines about it (a fault, the OOM killer)


def death_cause(res: Result) -> list[str]:
    """The telling lines of the daemon-died dump, [] if there is none."""
    dump: list[str] = []
    inside = False
    for ln in res.lines:
        if ln.text.startswith("XSVM-DUMP-BEGIN daemon-died"):
            inside = True
        elif inside and ln.text.startswith("XSVM-DUMP-END"):
            break
        elif inside:
            dump.append(ln.text[:200])
    sections: dict[str, list[str]] = {"log": []}
    name = "log"
    for text in dump:
        if text.startswith("== "):
            name = text[3:].strip()
            sections[name] = []
        elif text.strip():
            sections[name].append(text)
    log = sections["log"]
    # faulthandler's report reads from the top; a traceback or a log's last words from the end
    log = log[:DEATH_LOG_LINES] if log and PY_FAULT_RE.match(log[0]) else log[-DEATH_LOG_LINES:]
    kernel = [f"dmesg: {t}" for t in sections.get("dmesg", [])[-DEATH_KERNEL_LINES:]]
    return log + kernel


def print_excerpts(res: Result) -> None:
    texts = [ln.text for ln in res.lines]
    dumps: list[str] = []
    inside = False
    plain: list[str] = []
    for t in texts:
        if t.startswith("XSVM-DUMP-BEGIN"):
            inside = True
        if inside:
            dumps.append(t)
        elif not t.startswith("(XEN)"):
            plain.append(t)
        if t.startswith("XSVM-DUMP-END"):
            inside = False
    xen = [t for t in texts if t.startswith("(XEN)")]
    print("xenvm: ---- Xen console (last 80 lines) ----")
    print("\n".join(xen[-80:]))
    print("xenvm: ---- dom0 console (last 60 lines) ----")
    print("\n".join(plain[-60:]))
    if dumps:
        print("xenvm: ---- logs dumped by dom0 (xenstored, xl, guest consoles, dmesg) ----")
        print("\n".join(dumps[-700:]))  # the end holds what matters most (guest-lost)
    print("xenvm: ---- end of excerpts ----", flush=True)


# ----------------------------------------------------------------------------- main
def run(guests: list[str], daemon: str = "ours", timeout: float = 300, cache: Path = DEFAULT_CACHE,
        keep: bool = False, echo: bool = False, probe: str | None = None,
        live_update: bool = False, retries: int = 2,
        devices: list[str] | None = None, from_deb: bool = False) -> tuple[str, str]:
    """Boot and check; returns ("pass" | "fail" | "inconclusive", verdict line).

    ``devices``: the device and lifecycle stages to run with the (PV) guest, from DEVICE_STAGES.
    """
    t0 = time.monotonic()
    qemu = ensure_qemu()
    root = fetch(cache)
    precompile()
    python, pythonpath = install_from_deb(cache) if from_deb and daemon == "ours" else (sys.executable, str(REPO))
    conf = {
        "XSVM_DAEMON": daemon,
        "XSVM_PYTHON": python,
        "XSVM_PYTHONPATH": pythonpath,
        "XSVM_LIBDIR": ":".join(str(root / d) for d in LIBDIRS),
        "XSVM_GUEST_KERNEL": f"/host{root / 'boot' / 'vmlinux-guest'}",
        "XSVM_VERBOSE": "1" if keep else "",
        "XSVM_PROBE": str(Path(probe).resolve()) if probe else "",
        # Read by dom0 through the host's root, like the daemon: a lost guest's ring (see README).
        "XSVM_RINGDUMP": str(HERE / "ringdump.py"),
        # XS_XENVM_CANARY=1: a plain-Python control process beside the daemon (canary.py)
        "XSVM_CANARY": str(HERE / "canary.py") if os.environ.get("XS_XENVM_CANARY") else "",
        "XSVM_LIVE_UPDATE": "1" if live_update else "",
        "XSVM_STRESS": os.environ.get("XS_XENVM_STRESS", ""),
        "XSVM_CPU": os.environ.get("XS_XENVM_CPU", ""),
        "XSVM_PYTIME": os.environ.get("XS_XENVM_PYTIME", ""),
        "XSVM_DEVICES": " ".join(devices or []),
    }
    work = Path(tempfile.mkdtemp(prefix="xenvm-"))
    try:
        dom0 = work / "dom0.cpio"
        dom0.write_bytes(build_dom0_initramfs(root, conf, guests, bool(devices)))
        log(f"images built in {time.monotonic() - t0:.1f}s "
            f"(dom0 initramfs {dom0.stat().st_size >> 20} MiB); booting, timeout {timeout:.0f}s")
        console_log = work / "console.log"
        notes: list[str] = []
        for attempt in range(1, retries + 2):
            res = boot(qemu, root, dom0, timeout, console_log, echo)
            ok, line = report(res, console_log, guests, daemon, live_update, devices)
            crashes = platform_crashes(res)
            if ok or not crashes or attempt > retries:
                break
            notes.append(f"attempt {attempt} lost to a platform crash ({crashes[0]!r})")
            log(f"{line}\nxenvm: attempt {attempt} failed with a crash outside the daemon "
                f"({'; '.join(crashes[:3])}); retrying")
            shutil.copy(console_log, work / f"console-attempt{attempt}.log")
        if notes:
            line += " [" + "; ".join(notes) + "]"
            # The lost attempts' whole consoles, to tell later which process crashed and where.
            lost_dir = cache / "last-retried"
            shutil.rmtree(lost_dir, ignore_errors=True)
            lost_dir.mkdir(parents=True)
            for f in sorted(work.glob("console-attempt*.log")):
                shutil.copy(f, lost_dir / f.name)
            line += f" (lost attempts' consoles: {lost_dir})"
        status = "pass" if ok else "fail"
        if not ok and crashes:
            # Every attempt hit a crash outside the daemon: nothing learnt about the daemon.
            status = "inconclusive"
            line = line.replace("XENVM FAIL:", "XENVM INCONCLUSIVE (platform crash on every attempt):", 1)
        if not ok or keep:
            keep_dir = cache / "last-failure" if not ok else cache / "last-run"
            shutil.rmtree(keep_dir, ignore_errors=True)
            keep_dir.mkdir(parents=True)
            shutil.copy(console_log, keep_dir / "console.log")
            line = line.replace(str(console_log), str(keep_dir / "console.log"))
        return status, line
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guests", default=None,
                   help="comma-separated: pv, pvh (default both); with --devices the one device guest "
                        "(default pv)")
    p.add_argument("--daemon", choices=["ours", "c"], default="ours",
                   help="ours (python3 -m xenstored) or c (Debian's xenstored, as a control)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds for one boot (default $XS_XENVM_TIMEOUT, else 300; 600 with --devices)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--keep", action="store_true", help="keep the console log of a passing run too, with the daemon's log in it")
    p.add_argument("--echo", action="store_true", help="print the console as it arrives")
    p.add_argument("--probe", metavar="FILE",
                   help="a Python script to run in dom0 (host's python3, chrooted) before the daemon")
    p.add_argument("--from-deb", action="store_true",
                   help="run the daemon from this checkout's built Debian package on Debian's python3 and trio")
    p.add_argument("--live-update", action="store_true",
                   help="live-update the daemon (xenstore-control) while the first guest runs")
    p.add_argument("--retries", type=int, default=int(os.environ.get("XS_XENVM_RETRIES", "2")),
                   help="boots to retry when a run fails because a process outside the daemon "
                        "crashed (QEMU TCG flakiness, see README); default 2")
    p.add_argument("--devices", nargs="?", const="all", metavar="STAGES",
                   help="device and lifecycle run with a PV guest: disk, vif, hotplug, save/restore, "
                        f"reboot, shutdown; STAGES is a comma-separated subset of {','.join(DEVICE_STAGES)} "
                        "(default all)")
    a = p.parse_args(argv)
    guests = [g for g in (a.guests or "pv,pvh").split(",") if g]
    if any(g not in ("pv", "pvh") for g in guests):
        p.error("guests are pv and/or pvh")
    devices: list[str] | None = None
    if a.devices:
        wanted = DEVICE_STAGES if a.devices == "all" else a.devices.split(",")
        unknown = [s for s in wanted if s not in DEVICE_STAGES]
        if unknown:
            p.error(f"unknown device stages {unknown}: choose from {','.join(DEVICE_STAGES)}")
        devices = [s for s in DEVICE_STAGES if s in wanted]  # always in run order
        for s, need in DEVICE_NEEDS.items():
            if s in devices and need not in devices:
                p.error(f"device stage {s} needs {need}")
        # The device run is about one guest's devices and lifecycle: PV unless --guests says pvh.
        if a.guests is None:
            guests = ["pv"]
        elif len(guests) != 1:
            p.error("the device run has one guest: --guests pv or --guests pvh")
    timeout = a.timeout or float(os.environ.get("XS_XENVM_TIMEOUT") or (600 if devices else 300))
    try:
        status, line = run(guests, a.daemon, timeout, a.cache, a.keep, a.echo, a.probe,
                           a.live_update, a.retries, devices, a.from_deb)
    except EnvError as e:
        print(f"XENVM SKIP: {e}", flush=True)
        return 2
    print(line, flush=True)
    return {"pass": 0, "fail": 1, "inconclusive": 3}[status]


if __name__ == "__main__":
    sys.exit(main())
