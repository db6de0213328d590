"""Running as the dom0 service: options, config file, systemd unit and notify protocol, forking
like cxenstored for Debian's init script, pid file, logging, trace file and access log."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import start_daemon, stop_daemon_process
from test_cli_tools import xenstore_control

from xenstored.cli import config_from_args
from xenstored.client import SyncClient
from xenstored.config import Config, ConfigError, load_file

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "x.conf"
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------ config file and options
def test_shipped_config_file_parses_to_the_defaults():
    cfg = Config()
    assert load_file(cfg, str(REPO / "conf" / "xenstored.conf")) == []
    assert cfg.quotas.values == Config().quotas.values
    assert cfg.emulate is None and cfg.persistent is False


def test_oxenstored_keys_map_and_unused_ones_are_noted(tmp_path):
    cfg = Config()
    notes = load_file(cfg, write(tmp_path, "quota-maxentity = 7\nmerge-activate = true\nperms-activate=false\n"))
    assert cfg.quotas["nodes"] == 7 and cfg.perms_activate is False
    assert any("merge-activate" in n for n in notes)


@pytest.mark.parametrize(
    "text,where",
    [
        ("# c\nquota-nodes = lots\n", ":2: bad value for 'quota-nodes'"),
        ("persistent = maybe\n", ":1: bad value for 'persistent'"),
        ("just words\n", ":1: expected 'key = value'"),
        ("quota-watches = -3\n", ":1: bad value for 'quota-watches'"),
    ],
)
def test_bad_config_lines_name_file_line_and_key(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_file(Config(), path)
    assert str(e.value).startswith(path) and where in str(e.value)


def test_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path, "quota-nodes = 5\nquota-watches = 9\npersistent = true\n")
    cfg, _ = config_from_args(["--config", path, "-E", "7", "--rundir", str(tmp_path)])
    assert cfg.quotas["nodes"] == 7 and cfg.quotas["watches"] == 9 and cfg.persistent


def test_cxenstored_options_are_accepted(tmp_path, capsys):
    argv = "-N -E 10 -S 100 -W 3 -t 2 -A 4 -M 99 -Q outstanding=5 -Q memory=1000000 -q memory=900000 "
    argv += "-w watch-event=7 -R -I -K -V --master-domid 0 --priv-domid 0 -X --rundir " + str(tmp_path)
    cfg, args = config_from_args(argv.split())
    q = cfg.quotas
    assert (q["nodes"], q["node-size"], q["watches"], q["transactions"]) == (10, 100, 3, 2)
    assert (q["node-permissions"], q["path-max"], q["outstanding"]) == (4, 99, 5)
    assert (q["memory"], q["soft-memory"], cfg.watch_event_timeout) == (1000000, 900000, 7.0)
    assert cfg.keep_orphans and cfg.log_level == "debug" and args.no_fork
    assert "ignoring unknown argument -X" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-Q", "nodes"], ["-Q", "bogus=1"], ["-q", "nodes=5"], ["-w", "other=1"]])
def test_bad_option_values_are_clear_errors(argv):
    with pytest.raises(SystemExit) as e:
        config_from_args(argv)
    assert "xenstored:" in str(e.value)


# ------------------------------------------------------------------ systemd
def unit_exec_start(path: Path) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return shlex.split(parser["Service"]["ExecStart"].strip().splitlines()[-1])


def test_unit_exec_start_runs_as_written_and_speaks_the_notify_protocol():
    unit = REPO / "systemd" / "xenstored.service"
    text = unit.read_text()
    assert "Type=notify" in text and "NotifyAccess=all" in text
    assert "ConditionPathExists=/proc/xen/capabilities" in text
    assert "PrivateDevices" not in text  # /dev/xen must stay reachable
    argv = unit_exec_start(unit)
    assert argv[0] == "/usr/local/bin/xenstored" and "-N" in argv
    drop_in = unit_exec_start(REPO / "systemd" / "xenstored.service.d" / "python-xenstored.conf")
    assert drop_in == argv
    # The same words, with the installed command and this checkout's config file.
    argv[0] = shutil.which("xenstored") or pytest.fail("the xenstored command is not installed")
    argv[argv.index("--config") + 1] = str(REPO / "conf" / "xenstored.conf")
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(rundir, "notify"))
    notify.settimeout(15)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    env.update(XENSTORED_RUNDIR=rundir, NOTIFY_SOCKET=os.path.join(rundir, "notify"))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg and f"MAINPID={proc.pid}" in msg
        with SyncClient(os.path.join(rundir, "socket")) as c:
            assert c.ls("/") == ["tool"]
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)


# ------------------------------------------------------------------ forking, as Debian's init script runs it
def test_forks_like_cxenstored_and_answers_within_a_second(tmp_path):
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    pidfile = os.path.join(rundir, "xenstored.pid")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "xenstored", "--pid-file", pidfile, "-P", "--rundir", rundir],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    try:
        assert r.returncode == 0, r.stderr
        pid = int(Path(pidfile).read_text())
        assert r.stdout.strip() == str(pid)
        tool = subprocess.run(
            ["xenstore-read", "-s", "/tool/xenstored"],
            env=dict(env, XENSTORED_PATH=os.path.join(rundir, "socket")),
            capture_output=True, timeout=5, check=False,
        )
        elapsed = time.monotonic() - start
        assert tool.returncode == 0, tool.stderr
        assert elapsed < 3.0, elapsed  # 1 s when the machine is quiet; CI shares its cores
        # A second start while the pid file is locked exits 0 and changes nothing (as C).
        again = subprocess.run(
            [sys.executable, "-m", "xenstored", "--pid-file", pidfile, "--rundir", rundir],
            env=env, capture_output=True, timeout=30, check=False,
        )
        assert again.returncode == 0
        assert int(Path(pidfile).read_text()) == pid
    finally:
        try:
            os.kill(int(Path(pidfile).read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        shutil.rmtree(rundir, ignore_errors=True)


# ------------------------------------------------------------------ logging
def test_sighup_reopens_the_log_file():
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    log = os.path.join(rundir, "x.log")
    d = start_daemon("--log-file", log, rundir=rundir)
    try:
        # The socket accepts (which start_daemon waits for) a moment before "ready" is logged.
        deadline = time.monotonic() + 10
        while "ready" not in Path(log).read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "ready" in Path(log).read_text()
        os.rename(log, log + ".1")
        d.proc.send_signal(signal.SIGHUP)
        while not os.path.exists(log) and time.monotonic() < deadline:  # reopened: a new file
            time.sleep(0.05)
        with SyncClient(d.socket) as c:
            c.control("print", "after-rotation")
        while "after-rotation" not in Path(log).read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "after-rotation" in Path(log).read_text()
    finally:
        stop_daemon_process(d.proc)
        shutil.rmtree(rundir, ignore_errors=True)


def test_trace_file_in_c_format_and_control_log_switch():
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    trace = os.path.join(rundir, "trace")
    d = start_daemon("-T", trace, rundir=rundir)
    try:
        with SyncClient(d.socket) as c:
            c.write("/t/x", "v")
            c.read("/t/x")
        lines = Path(trace).read_text().splitlines()
        ins = [ln for ln in lines if ln.startswith("IN ") and " READ (" in ln]
        assert ins and ins[0].endswith("READ (/t/x )")
        fields = ins[0].split()
        assert fields[1].startswith("0x") and len(fields[2]) == 8 and fields[2].isdigit()
        assert any(ln.startswith("OUT ") and "WRITE (OK )" in ln for ln in lines)
        ctl = xenstore_control()
        env = d.env
        assert subprocess.run([ctl, "log", "off"], env=env, check=False, timeout=10).returncode == 0
        size = os.path.getsize(trace)
        with SyncClient(d.socket) as c:
            c.read("/t/x")
        assert os.path.getsize(trace) == size
        report = os.path.join(rundir, "mem")
        assert subprocess.run([ctl, "memreport", report], env=env, check=False, timeout=10).returncode == 0
        assert "nodes:" in Path(report).read_text()
        new = os.path.join(rundir, "trace2")
        assert subprocess.run([ctl, "logfile", new], env=env, check=False, timeout=10).returncode == 0
        with SyncClient(d.socket) as c:
            c.read("/t/x")
        assert "READ (/t/x )" in Path(new).read_text()
    finally:
        stop_daemon_process(d.proc)
        shutil.rmtree(rundir, ignore_errors=True)


def test_access_log_as_oxenstored_with_rotation():
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    access = os.path.join(rundir, "access.log")
    conf = os.path.join(rundir, "x.conf")
    Path(conf).write_text(f"access-log-file = {access}\naccess-log-nb-lines = 10\naccess-log-nb-files = 3\n")
    d = start_daemon("--config", conf, rundir=rundir)
    try:
        with SyncClient(d.socket) as c:
            for i in range(30):
                c.write(f"/a/n{i}", "v")
            c.read("/a/n0")  # read ops are not logged by default
        assert os.path.exists(access + ".1") and os.path.exists(access + ".2")
        assert not os.path.exists(access + ".3")
        text = Path(access + ".1").read_text()
        line = next(ln for ln in text.splitlines() if " write " in ln)
        assert line.startswith("[") and "T" in line[:20] and line[23] == "]"
        assert " A" in line and "/a/n" in line
        assert "read " not in Path(access).read_text()
    finally:
        stop_daemon_process(d.proc)
        shutil.rmtree(rundir, ignore_errors=True)


def test_a_second_daemon_on_the_same_rundir_refuses_and_harms_nothing(daemon):
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    r = subprocess.run(
        [sys.executable, "-m", "xenstored", "-N", "--rundir", daemon.rundir],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert r.returncode == 1 and "another daemon is serving" in r.stderr and "Traceback" not in r.stderr
    with SyncClient(daemon.socket) as c:
        c.write("/still", "here")
    from xenstored import guest as guestlib

    assert guestlib.control("exists 0", os.path.join(daemon.rundir, "fx")) == "ok 1"  # its evtchn.sock too
