"""Guest names as systemd instance names: ``systemd_escape`` prints what ``systemd-escape`` does."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xen_vhost_master.names import UNIT_NAME_MAX, instance_unit, path_name, systemd_escape

SYSTEMD_ESCAPE = shutil.which("systemd-escape")
NAMES = ["vm1", "guest_1:2", "a b/c-d.é", ".hidden", "x\\y", "-", "/x", "a/b", "ünïcødé", "$(reboot)", "tab\there"]


def real(name: str) -> str:
    assert SYSTEMD_ESCAPE is not None
    return subprocess.run([SYSTEMD_ESCAPE, "--", name], capture_output=True, text=True, check=True).stdout.rstrip("\n")


@pytest.mark.skipif(SYSTEMD_ESCAPE is None, reason="systemd-escape not installed")
@pytest.mark.parametrize("name", NAMES)
def test_known_names_match_systemd_escape(name: str) -> None:
    assert systemd_escape(name) == real(name)


@pytest.mark.skipif(SYSTEMD_ESCAPE is None, reason="systemd-escape not installed")
@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0\n"), min_size=1, max_size=20))
def test_any_name_matches_systemd_escape(name: str) -> None:
    assert systemd_escape(name) == real(name)


def test_escaping_is_fixed_and_units_are_bounded() -> None:
    assert systemd_escape("a b/c-d.é") == "a\\x20b-c\\x2dd.\\xc3\\xa9"  # without the binary too
    assert systemd_escape("a/b") != systemd_escape("a-b")  # two guests never share an instance
    assert instance_unit("vm1") == "xen-vhost-master@vm1.service"
    with pytest.raises(ValueError):
        instance_unit("")
    with pytest.raises(ValueError):
        instance_unit("é" * 40)  # 320 bytes once escaped
    assert len(instance_unit("a" * (UNIT_NAME_MAX - len("xen-vhost-master@.service")))) == UNIT_NAME_MAX


def test_path_name_is_the_name_unless_it_is_not_one_plain_path_component() -> None:
    assert path_name("web-1") == "web-1" and path_name("db 2.é") == "db 2.é"
    for odd in ("a/b", ".hidden", "..", "", "x\0y"):
        assert path_name(odd) == systemd_escape(odd) and "/" not in path_name(odd)
