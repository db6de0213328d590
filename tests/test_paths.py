"""Path syntax: validation, canonical form, relative paths, special names, path-max."""

from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from xenstored import paths
from xenstored.wire import XsError

HOME = "/local/domain/5"


@pytest.mark.parametrize("good", ["/", "/a", "/a/b-c_d", "/local/domain/0/x@y", "/A9"])
def test_valid_absolute_paths(good):
    assert paths.canonicalize(good, HOME) == good


@pytest.mark.parametrize(
    "bad", ["", "//", "/a/", "/a//b", "/a.b", "/a b", "/a:b", "/é", "@introduceDomain", "/local/domain/"]
)
def test_invalid_paths_are_einval(bad):
    with pytest.raises(XsError) as e:
        paths.canonicalize(bad, HOME)
    assert e.value.name == "EINVAL"


def test_relative_paths_hang_below_home():
    assert paths.canonicalize("device/vbd", HOME) == "/local/domain/5/device/vbd"
    assert paths.relative_to("/local/domain/5/device/vbd", HOME) == "device/vbd"
    assert paths.relative_to("/tool", HOME) == "/tool"


@pytest.mark.parametrize(
    "special", ["@introduceDomain", "@releaseDomain", "@releaseDomain/7", "@introduceDomain/0"]
)
def test_special_names(special):
    assert paths.canonicalize_any(special, HOME) == special
    assert paths.is_special(special)


@pytest.mark.parametrize("bad", ["@foo", "@releaseDomain/", "@releaseDomain/x", "@releaseDomain/123456", "@"])
def test_bad_special_names(bad):
    with pytest.raises(XsError):
        paths.canonicalize_any(bad, HOME)


def test_effective_length_counts_below_the_domain_home():
    assert paths.effective_length("/local/domain/12/abc") == 3
    assert paths.effective_length("/abc") == 4
    assert paths.effective_length("/local/domain/123456/a") == len("/local/domain/123456/a")


def test_tree_helpers():
    assert paths.parent("/a/b") == "/a" and paths.parent("/a") == "/"
    assert paths.basename("/a/b") == "b"
    assert paths.join("/", "a") == "/a" and paths.join("/a", "b") == "/a/b"
    assert paths.ancestors("/a/b") == ["/a/b", "/a", "/"]
    assert paths.depth_below("/a/b/c", "/a") == 2 and paths.depth_below("/a", "/") == 1
    assert paths.depth_below("/a", "/a") == 0
    assert paths.is_descendant_or_self("/a/b", "/a")
    assert not paths.is_descendant_or_self("/ab", "/a")
    assert paths.is_descendant_or_self("/ab", "/")


def test_non_ascii_is_einval():
    with pytest.raises(XsError):
        paths.decode(b"/\xff")


_PIECES = st.sampled_from(["a", "B9", "_", "-", "@", "/", "//", ".", "\x00", "\u00e9", " ", "\n"])


@settings(max_examples=400)
@given(st.binary(max_size=12) | st.lists(_PIECES, max_size=8).map(lambda p: "".join(p).encode()))
@example(b"a/")
@example(b"/a.b")
@example(b"a.b")
@example(b"a//b")
@example(b"/a\n")
@example(b"a\n")
@example(b"@a")
@example(b"a/@b")
@example(b"-/_")
@example(b"")
def test_canonicalize_wire_is_decode_then_canonicalize(raw: bytes) -> None:
    """The fast form read from a request's bytes accepts, refuses and spells every path as the
    general one does."""
    home = paths.home_of(3)

    def outcome(fn: Callable[[], str]) -> str:
        try:
            return fn()
        except XsError as e:
            return e.name

    assert outcome(lambda: paths.canonicalize_wire(raw, home)) == outcome(
        lambda: paths.canonicalize(paths.decode(raw), home)
    )


def test_wire_path_cache_is_per_home_and_bounded() -> None:
    """A path seen before comes from the cache, spelt for the home that names it; a client
    naming ever new paths empties the cache rather than growing it."""
    assert paths.canonicalize_wire(b"device/vbd", "/local/domain/3") == "/local/domain/3/device/vbd"
    assert paths.canonicalize_wire(b"device/vbd", "/local/domain/4") == "/local/domain/4/device/vbd"
    assert paths.canonicalize_wire(b"device/vbd", "/local/domain/3") == "/local/domain/3/device/vbd"
    for i in range(2 * paths.WIRE_CACHE_MAX + 3):
        assert paths.canonicalize_wire(f"/n/{i}".encode(), "/local/domain/0") == f"/n/{i}"
        assert paths.canonicalize_wire(f"n/{i}".encode(), "/local/domain/0") == f"/local/domain/0/n/{i}"
    assert 0 < len(paths._absolute) <= paths.WIRE_CACHE_MAX
    assert 0 < len(paths._relative) <= paths.WIRE_CACHE_MAX
    with pytest.raises(XsError):  # refused paths are never cached, so refused every time
        paths.canonicalize_wire(b"/a//b", "/local/domain/0")
    with pytest.raises(XsError):
        paths.canonicalize_wire(b"/a//b", "/local/domain/0")
