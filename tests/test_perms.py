"""Permission lists: parsing and formatting, and who may read or write."""

import pytest

from xenstored import perms
from xenstored.perms import BOTH, NONE, READ, WRITE, Perm
from xenstored.wire import DOMID_ANY, XsError


def p(*entries: str) -> perms.Perms:
    return perms.parse([e.encode() for e in entries])


def test_parse_and_format_round_trip():
    ps = p("n0", "r5", "b7", "w3")
    assert ps == (Perm(0, NONE), Perm(5, READ), Perm(7, BOTH), Perm(3, WRITE))
    assert perms.format_list(ps) == b"n0\0r5\0b7\0w3\0"


def test_ids_parse_like_strtol_base_0():
    assert p("r0x10")[0].domid == 16
    assert p("r010")[0].domid == 8
    assert p("r+5")[0].domid == 5


@pytest.mark.parametrize("bad", ["", "x5", "r", "r5x", "r 5", "r-1", "r70000", "r0x", "rab", "r1_0"])
def test_bad_permission_strings_are_einval(bad):
    with pytest.raises(XsError) as e:
        p(bad)
    assert e.value.name == "EINVAL"


def test_empty_list_is_einval():
    with pytest.raises(XsError):
        perms.parse([])


def test_owner_has_full_access_and_letter_zero_is_for_others():
    ps = p("r5", "w7")
    assert perms.access_for(ps, 5) == BOTH
    assert perms.access_for(ps, 7) == WRITE
    assert perms.access_for(ps, 9) == READ


def test_first_matching_entry_wins():
    ps = p("n0", "r5", "b5")
    assert perms.access_for(ps, 5) == READ


def test_target_domain_acts_for_its_target():
    ps = p("n3", "r4")
    assert perms.access_for(ps, 9, target=3) == BOTH
    assert perms.access_for(ps, 9, target=4) == READ
    assert perms.is_owner(ps, 9, target=3)


def test_stale_entries_grant_nothing():
    ps = (Perm(0, NONE), Perm(5, BOTH, ignore=True))
    assert perms.access_for(ps, 5) == NONE
    assert perms.format_list(ps) == b"n0\0b5\0"


def test_domid_any_matches_everyone():
    ps = (Perm(0, NONE), Perm(DOMID_ANY, READ))
    assert perms.allows(ps, 42, None, READ)
    assert not perms.allows(ps, 42, None, WRITE)


def test_any_of_rule_for_error_choice():
    ps = p("n0", "w5")
    assert perms.allows_any(ps, 5, None, READ | WRITE)
    assert not perms.allows(ps, 5, None, READ | WRITE)


def test_new_owner_keeps_others_letter():
    assert perms.with_owner(p("r0", "b5"), 5) == p("r5", "b5")
    assert perms.without_domain(p("n0", "r5", "b6"), 5) == p("n0", "b6")
    assert perms.without_domain(p("n0"), 5) is None
