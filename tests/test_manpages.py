"""The man pages in man/ are generated from the code (man/generate.py): these tests fail when a
committed page differs from what the generator makes now, when an option or config key is
missing from a page, or when the shipped config file stops listing every key with its default.
Run ``python3 man/generate.py`` after changing an option, a key or a default."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from xenstored import cli, config
from xenstored.config import Config, load_file

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("man_generate", MAN / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _troff(flag: str) -> str:
    return flag.replace("-", "\\-")


@pytest.mark.parametrize("name", gen.PAGES)
def test_committed_page_is_what_the_generator_makes(name: str) -> None:
    committed = (MAN / name).read_text(encoding="utf-8")
    assert committed == gen.render()[name], f"man/{name} is stale: run python3 man/generate.py"


def test_every_xenstored_option_is_on_the_page() -> None:
    page = (MAN / "xenstored.8").read_text(encoding="utf-8")
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert f"\\fB{_troff(flag)}\\fR" in page, flag


def test_every_config_key_is_on_the_page_with_the_default_the_code_uses() -> None:
    page = (MAN / "xenstored.conf.5").read_text(encoding="utf-8")
    for key in config.KEYS:
        assert f".TP\n\\fB{_troff(key)}\\fR" in page, key
    for key in config.IGNORED_KEYS:
        assert f"\\fB{_troff(key)}\\fR" in page, key
    base = Config()
    assert f"Default: \\fB{base.quotas.values['nodes']}\\fR." in page
    assert f"Default: \\fB{base.access_log_lines}\\fR." in page


def test_every_xenstore_guest_option_is_on_the_page() -> None:
    page = (MAN / "xenstore-guest.1").read_text(encoding="utf-8")
    for action in gen.guest_parser()._actions:
        for flag in action.option_strings:
            assert f"\\fB{_troff(flag)}\\fR" in page, flag


def test_an_undocumented_option_or_key_stops_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only a diff: a new option or key without prose makes the generator fail."""
    real = cli.build_parser

    def with_new_option():
        p = real()
        p.add_argument("--brand-new-option")
        return p

    monkeypatch.setattr(cli, "build_parser", with_new_option)
    with pytest.raises(gen.DocError, match="brand_new_option"):
        gen.xenstored_page("0")
    monkeypatch.undo()
    monkeypatch.setitem(config.KEYS, "brand-new-key", config._attr("fakexen_dir", str))
    with pytest.raises(gen.DocError, match="brand-new-key"):
        gen.conf_page("0")


def test_the_pages_carry_the_package_version() -> None:
    version = gen.version()
    changelog = (ROOT / "debian" / "changelog").read_text(encoding="utf-8").splitlines()[0]
    assert f"({version})" in changelog, "debian/changelog and pyproject.toml disagree on the version"
    for name in gen.PAGES:
        assert f'"xenstored {version}"' in (MAN / name).read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("name", gen.PAGES)
def test_page_formats_without_warnings(name: str) -> None:
    out = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / name)], capture_output=True, text=True, check=True
    )
    assert out.stderr == ""


# -- conf/xenstored.conf, installed as /etc/xen/xenstored.conf ------------------------------------


def test_shipped_config_sets_only_defaults() -> None:
    """Its header promises "every key is listed with its default": loading it changes nothing."""
    cfg = Config()
    assert load_file(cfg, str(ROOT / "conf" / "xenstored.conf")) == []
    assert cfg == Config()


def test_shipped_config_lists_every_key() -> None:
    """Each key is set or shown commented out; the oxenstored spellings are named in comments."""
    text = (ROOT / "conf" / "xenstored.conf").read_text(encoding="utf-8")
    listed = set(re.findall(r"^#? ?([a-z][a-z-]*) =", text, re.MULTILINE))
    primary = {k.name for k in gen.config_keys() if k.alias_of is None}
    assert primary - listed == set()
    assert listed - set(config.KEYS) == set()
