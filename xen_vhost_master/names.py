"""Guest names as systemd sees them: the instance part of ``xen-vhost-master@<instance>.service``,
and as one path component (:func:`path_name`: the runtime directory ``/run/xen-vhost-master/<name>/``,
which ``RuntimeDirectory=`` of the template unit makes from ``%I``, the name itself).

The escaping is systemd's ``unit_name_escape()`` (src/basic/unit-name.c), what
``systemd-escape NAME`` prints: ``/`` becomes ``-``; every byte of the UTF-8 encoding outside
``[A-Za-z0-9:_.]`` becomes ``\\xNN`` (lower-case hex), and so do ``-`` and ``\\``; a leading ``.``
is escaped too (no hidden unit names).
"""

from __future__ import annotations

__all__ = ["UNIT_NAME_MAX", "instance_unit", "path_name", "systemd_escape"]

# src/basic/unit-name.h: UNIT_NAME_MAX 256, including the terminating NUL.
UNIT_NAME_MAX = 255
INSTANCE_TEMPLATE = "xen-vhost-master@{}.service"

_VALID = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:_.")


def systemd_escape(name: str) -> str:
    """``systemd-escape NAME`` (instance-name escaping, not ``--path``)."""
    raw = name.encode("utf-8", "surrogateescape")
    out = []
    for i, byte in enumerate(raw):
        if byte == ord("/"):
            out.append("-")
        elif byte in _VALID and not (i == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def instance_unit(name: str) -> str:
    """``xen-vhost-master@<escaped name>.service``; ValueError if systemd cannot name it (an empty
    name, or longer than UNIT_NAME_MAX once escaped)."""
    if not name:
        raise ValueError("an empty guest name has no unit")
    unit = INSTANCE_TEMPLATE.format(systemd_escape(name))
    if len(unit) > UNIT_NAME_MAX:
        raise ValueError(f"unit name for guest {name[:40]!r}... is {len(unit)} bytes, systemd allows {UNIT_NAME_MAX}")
    return unit


def path_name(name: str) -> str:
    """``name`` as one path component for the operator's own files (``{name}`` in a socket
    template, ``<config-dir>/<name>.toml``): the name itself when it is one plain component (not
    empty, no '/' or NUL, not starting with '.'), so ``web-1`` stays ``web-1`` (what a back-end
    unit's ``%I`` expands to); otherwise its :func:`systemd_escape` form."""
    if name and "/" not in name and "\0" not in name and not name.startswith("."):
        return name
    return systemd_escape(name)
