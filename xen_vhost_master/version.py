"""``--version``: the installed distribution's version, looked up only when asked for (importlib.metadata
costs start-up time every other command does not need to pay)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["DISTRIBUTION", "VersionAction", "version"]

#: The distribution name of pyproject.toml's [project] table (and of the Debian package).
DISTRIBUTION = "xen-vhost-master"


def version() -> str:
    """The version of the installed distribution, or ``unknown`` when it is run from a source tree
    that is not installed (its metadata is then nowhere to be found)."""
    from importlib.metadata import PackageNotFoundError  # noqa: PLC0415
    from importlib.metadata import version as dist_version  # noqa: PLC0415

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    """argparse's own ``action="version"`` needs the string when the parser is built; this one
    looks it up when the flag is given."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = "print the version and exit") -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()
