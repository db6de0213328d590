"""Why a daemon does not start, said once, in one line, with exit status 1, and with nothing left
behind; and the options that must act before anything is touched (--help, --version).

Every test runs the real command (``python -m xenstored``) as an operator or an init script
would, in the foreground (-N) and forked (cxenstored's default, where the reason has to travel
from the daemon to the parent that the operator is looking at).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, start_daemon, stop_daemon_process

from xenstored import guest as guestlib
from xenstored.client import SyncClient
from xenstored.config import Config, load_file


def env_without_xenstored() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("XENSTORED_", "FAKEXEN_"))}


def xenstored(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenstored", *args],
        env=env if env is not None else env_without_xenstored(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def absent_rundir() -> Iterator[str]:
    """A run directory that does not exist yet: a refusal must not create it."""
    parent = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    try:
        yield os.path.join(parent, "run")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# ------------------------------------------------------------------ item 1: --help, --version
@pytest.mark.parametrize("fork", [False, True], ids=["foreground", "forking"])
@pytest.mark.parametrize(
    "option,expect", [("--version", "xenstored (Python) "), ("-h", "usage: xenstored"), ("--help", "usage: xenstored")]
)
def test_help_and_version_print_and_exit_0_before_touching_the_run_directory(absent_rundir, option, expect, fork):
    env = dict(env_without_xenstored(), XENSTORED_RUNDIR=absent_rundir)
    r = xenstored(*([] if fork else ["-N"]), option, env=env, timeout=15)
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout
    assert r.stderr == ""  # no "ignoring unknown arguments", no log line: no daemon started
    assert not os.path.exists(absent_rundir)
    if option != "--version":
        assert "--rundir" in r.stdout and "--log-level" in r.stdout


# ------------------------------------------------------------------ item 2: a second daemon
@pytest.mark.parametrize("extra", [[], ["--log-file", "stderr"]], ids=["syslog", "log-to-stderr"])
def test_a_forked_second_daemon_prints_the_reason_in_the_parent(daemon: Daemon, extra):
    r = xenstored("--rundir", daemon.rundir, *extra)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line == f"xenstored: cannot listen on {daemon.socket}: another daemon is serving {daemon.socket}"
    with SyncClient(daemon.socket) as c:  # the live socket was not unlinked
        c.write("/still", "here")
    assert guestlib.control("exists 0", os.path.join(daemon.rundir, "fx")) == "ok 1"


def test_a_foreground_second_daemon_refuses_and_keeps_the_live_socket(daemon: Daemon):
    r = xenstored("-N", "--rundir", daemon.rundir)
    assert r.returncode == 1
    assert "another daemon is serving" in one_line(r.stderr)
    assert os.path.exists(daemon.socket)
    with SyncClient(daemon.socket) as c:
        assert c.read("/tool/xenstored") == b""


# ------------------------------------------------------------------ item 3: unwritable run directory
def unwritable_rundirs(tmp: str) -> list[tuple[str, str]]:
    """(run directory, the words the refusal must contain) that fail whoever runs the tests."""
    Path(tmp, "afile").write_text("x")
    cases = [
        (os.path.join(tmp, "afile", "run"), f"{tmp}/afile is not a directory"),
        ("/proc/xenstored-test-run", "No such file or directory"),
    ]
    if os.geteuid() != 0:
        ro = os.path.join(tmp, "ro")
        os.mkdir(ro, 0o500)
        cases.append((os.path.join(ro, "run"), "is not writable"))
    return cases


@pytest.mark.parametrize("fork", [False, True], ids=["foreground", "forking"])
def test_an_unwritable_run_directory_is_one_line_and_creates_nothing(fork):
    tmp = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    try:
        for rundir, words in unwritable_rundirs(tmp):
            r = xenstored(*([] if fork else ["-N"]), "--rundir", rundir)
            assert r.returncode == 1, (rundir, r.stderr)
            line = one_line(r.stderr)
            assert line.startswith(f"xenstored: cannot create run directory {rundir}: "), line
            assert words in line
            assert not os.path.lexists(rundir)
        assert sorted(os.listdir(tmp)) in (["afile"], ["afile", "ro"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_run_directory_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "run"
    f.write_text("")
    r = xenstored("-N", "--rundir", str(f))
    assert r.returncode == 1
    assert one_line(r.stderr) == f"xenstored: run directory {f} exists and is not a directory"


# ------------------------------------------------------------------ item 3: config values
@pytest.mark.parametrize(
    "text,lineno,says",
    [
        ("# quotas\nquota-nodes = lots\n", 2, "bad value for 'quota-nodes': expected a whole number >= 0, got 'lots'"),
        ("persistent-interval = soon\n", 1, "bad value for 'persistent-interval': expected a number of seconds"),
        ("emulate = maybe\n", 1, "bad value for 'emulate': expected true, false or auto, got 'maybe'"),
        ("keep-orphans = perhaps\n", 1, "bad value for 'keep-orphans': expected true or false"),
        ("log-level = loud\n", 1, "bad value for 'log-level': expected one of debug, info, warning, error"),
        ("xenstored-log-level = loud\n", 1, "expected one of debug, info, warning, error, got 'loud'"),
        ("access-log-nb-chars = x\n", 1, "bad value for 'access-log-nb-chars': expected a whole number"),
        ("quota-watches = 99999999999\n", 1, "bad value for 'quota-watches': bad quota value 99999999999"),
        ("\n\njust words\n", 3, "expected 'key = value', got 'just words'"),
    ],
)
def test_a_bad_config_value_names_file_line_and_key_and_exits_1(tmp_path, absent_rundir, text, lineno, says):
    conf = tmp_path / "xenstored.conf"
    conf.write_text(text)
    r = xenstored("-N", "--config", str(conf), "--rundir", absent_rundir)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith(f"xenstored: {conf}:{lineno}: "), line
    assert says in line
    assert "invalid literal" not in line and "could not convert" not in line
    assert not os.path.exists(absent_rundir)


def test_emulate_auto_is_accepted(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("emulate = auto\nemulate = AUTO\n")
    cfg = Config()
    cfg.emulate = True
    assert load_file(cfg, str(conf)) == [] and cfg.emulate is None


@pytest.mark.parametrize(
    "args,says,status",
    [
        # Malformed for the parser: argparse's status 2, as the man page says.
        (["--log-level", "loud"], "argument --log-level: expected one of debug, info, warning, error, got 'loud'", 2),
        (["-E", "lots"], "argument -E/--entry-nb: invalid int value: 'lots'", 2),
        (["-Q", "nodes"], "bad setting 'nodes' (want NAME=NUMBER)", 1),
    ],
)
def test_a_bad_option_value_is_one_line(absent_rundir, args, says, status):
    r = xenstored("-N", "--rundir", absent_rundir, *args)
    assert r.returncode == status
    assert says in one_line(r.stderr)
    assert not os.path.exists(absent_rundir)


def test_log_level_warn_is_warning(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("log-level = WARN\n")
    cfg = Config()
    load_file(cfg, str(conf))
    assert cfg.log_level == "warning"


# ------------------------------------------------------------------ item 4: unknown keys and options
def test_unknown_keys_and_options_warn_with_where_and_the_nearest_name(tmp_path):
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    conf = os.path.join(rundir, "x.conf")
    Path(conf).write_text("quota-nodes = 5\n# a comment\nquota-node = 7\nfrobnicate = 1\n")
    d = start_daemon("--config", conf, "--persistnt", "--no-such-thing", rundir=rundir)
    try:
        with SyncClient(d.socket) as c:
            assert c.control("quota") and c.read("/tool/xenstored") == b""
    finally:
        rc = stop_daemon_process(d.proc)
        log = d.log()
        shutil.rmtree(rundir, ignore_errors=True)
    assert rc == 0, log
    assert f"{conf}:3: warning: unknown key 'quota-node' ignored (did you mean 'quota-nodes'?)" in log
    assert f"{conf}:4: warning: unknown key 'frobnicate' ignored\n" in log
    assert "warning: ignoring unknown argument --persistnt (did you mean --persistent?)" in log
    assert "warning: ignoring unknown argument --no-such-thing\n" in log
    assert "Traceback" not in log


# ------------------------------------------------------------------ item 5: the emulated hypervisor's folder
@pytest.mark.parametrize("fork", [False, True], ids=["foreground", "forking"])
def test_a_second_daemon_on_the_same_emulated_hypervisor_refuses_and_harms_nothing(daemon: Daemon, fork):
    fx = os.path.join(daemon.rundir, "fx")
    other = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    try:
        env = dict(env_without_xenstored(), FAKEXEN_DIR=fx)
        r = xenstored(*([] if fork else ["-N"]), "--emulate", "--rundir", other, env=env)
        assert r.returncode == 1
        line = one_line(r.stderr)
        assert line.startswith(f"xenstored: the emulated hypervisor in {fx} is in use by another xenstored")
        assert f"(pid {daemon.proc.pid})" in line
        assert os.listdir(other) == []  # its own socket did not stay behind either
    finally:
        shutil.rmtree(other, ignore_errors=True)
    # The first daemon's hypervisor still answers, and its guests are still served.
    assert guestlib.control("exists 0", fx) == "ok 1"
    with SyncClient(daemon.socket) as c:
        c.write("/still", "here")


def test_the_folder_is_free_again_once_its_daemon_stopped():
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    try:
        first = start_daemon(rundir=rundir)
        assert stop_daemon_process(first.proc) == 0
        second = start_daemon(rundir=rundir)
        try:
            assert guestlib.control("exists 0", os.path.join(rundir, "fx")) == "ok 1"
        finally:
            assert stop_daemon_process(second.proc) == 0
        assert "Traceback" not in second.log()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
