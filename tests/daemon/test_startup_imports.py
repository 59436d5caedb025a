"""What the daemon imports before it serves: only what its start needs.

Under TCG (the real-Xen lab's dom0) every imported module costs tens of milliseconds, and the
daemon's start-up decides whether a guest's first access finds its window claimed. So: ``--help``,
an argument error and ``status --domain NAME`` import neither the supervisor nor the vhost-user
library (and with it construct) nor uvloop nor asyncio; the dispatcher (``watch``) none of the
vhost-user library; the serving daemon imports no test kit (hypothesis), none of the
simulator, none of the vhost-user back-end side, and the shadow and grant data paths, the TOML
parser and pathlib only when a device or a file needs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
before = set(sys.modules)
{imports}
print(json.dumps(sorted(set(sys.modules) - before)))
"""

NEVER_IN_THE_DAEMON = (
    "hypothesis", "pytest", "xen_vhost_sim", "vhost_user.aio.server", "vhost_user.aio.device",
    "vhost_user.testing", "vhost_user.trace", "vhost_user.backend",
)
ONLY_WHEN_USED = ("xen_vhost_master.datapath.shadow", "xen_vhost_master.datapath.grant_export", "xen_vhost_master.guestmem.grants", "xen_vhost_master.xen.gntdev",
                  "tomllib", "pathlib")


def _imported_by(imports: str) -> list[str]:
    # -S: no site, so nothing a virtualenv's .pth files import is counted
    out = subprocess.run([sys.executable, "-S", "-c", PROBE.format(imports=imports)], capture_output=True, text=True,
                         timeout=60, check=True, env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
    return json.loads(out.stdout)


def _matching(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_the_cli_module_imports_neither_the_supervisor_nor_vhost_user_nor_uvloop() -> None:
    loaded = _imported_by("import xen_vhost_master.cli")
    assert _matching(loaded, ("xen_vhost_master.supervisor", "vhost_user", "construct", "uvloop", "asyncio")) == []
    assert _matching(loaded, NEVER_IN_THE_DAEMON + ONLY_WHEN_USED) == []


def test_the_serving_daemon_imports_no_test_kit_simulator_back_end_side_or_unused_data_path() -> None:
    loaded = _imported_by("import xen_vhost_master.cli, xen_vhost_master.supervisor, uvloop")
    assert "vhost_user.aio.client" in loaded and "xen_vhost_master.device" in loaded  # the probe saw the daemon
    assert _matching(loaded, NEVER_IN_THE_DAEMON) == []
    assert _matching(loaded, ONLY_WHEN_USED) == []


def _imported_running(argv: list[str]) -> list[str]:
    # (the command ends with os._exit, cli.entry: here it raises instead, so the probe can report)
    probe = (f"import os, sys, runpy\nsys.argv = ['xen-vhost-master', *{argv!r}]\n"
             "def _exit(code):\n    raise SystemExit(code)\nos._exit = _exit\n"
             "try:\n    runpy.run_module('xen_vhost_master', run_name='__main__')\nexcept SystemExit:\n    pass\n")
    out = subprocess.run([sys.executable, "-S", "-c", PROBE.format(imports=probe)], capture_output=True, text=True,
                         timeout=60, check=True, env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
    return list(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["--domid", "banana"], ["status", "--domain", "web1"]])
def test_help_argument_errors_and_status_by_name_answer_without_the_supervisor(argv: list[str], tmp_path: Path) -> None:
    if argv[0] == "status":  # no daemon answers there: exit 69, after the whole status path ran
        argv = [*argv, "--runtime-dir", str(tmp_path)]
    loaded = _imported_running(argv)
    assert "xen_vhost_master.cli" in loaded  # the probe saw the command
    assert _matching(loaded, ("xen_vhost_master.supervisor", "vhost_user", "construct", "uvloop", "asyncio")) == []


def test_the_dispatcher_imports_no_vhost_user_nor_supervisor() -> None:
    loaded = _imported_running(["watch", "--help"])
    assert "xen_vhost_master.dispatcher" in loaded
    assert _matching(loaded, ("xen_vhost_master.supervisor", "xen_vhost_master.device", "vhost_user", "construct")) == []
    assert _matching(loaded, NEVER_IN_THE_DAEMON + ONLY_WHEN_USED) == []
