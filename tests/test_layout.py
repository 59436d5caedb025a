"""The import rules of docs/design.md §1, each pinned by a test, and the one way
the simulator reaches the daemon: a Platform from above (xen_vhost_master/platform.py).

* No daemon module imports the simulator (read from the sources with ast, so a lazy import inside
  a function counts too).
* The simulator (``sim/xen_vhost_sim``, its own source root) imports of the daemon only the Xen
  adapters and the platform; its ``tools/`` (demo, benchmarks) may import anything.
* The Xen adapters (``xen_vhost_master.xen``) import nothing of the project but ``errors``.
* The daemon's rooms import downwards (:data:`ROOM_RULES`): ``guestmem`` nothing of ``datapath``,
  ``device`` or ``backend``; ``datapath`` nothing of ``device``, ``supervisor``, ``cli`` or the
  simulator; the back-end kit (``backend``) nothing of ``device``, ``datapath`` or ``supervisor``;
  ``ioreq_server`` and ``fastpath`` nothing of ``device``, ``datapath`` or ``supervisor``; ``device``
  of ``datapath`` only ``datapath.base``; the pure transport models (``virtio_mmio``, ``virtio_pci``)
  nothing of the project but each other. Each rule is also shown to bite on a broken source.
* Importing the CLI, ``--help`` and the real platform load no simulator module.
* ``XEN_VHOST_SIM`` is the explicit request for the simulator's platform, found through the
  ``xen_vhost_master.platforms`` entry point; the daemon says at once which platform it runs on,
  and a request nobody installed is a configuration error, not a silent real dom0.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xen_vhost_master import cli
from xen_vhost_master.errors import ConfigError
from xen_vhost_master.platform import ENTRY_POINT_GROUP, SIM_ENTRY_POINT, platform_from_env

REPO = Path(__file__).resolve().parents[1]
DAEMON = REPO / "xen_vhost_master"
SIM_ROOT = REPO / "sim"
SIM = "xen_vhost_sim"
TIMEOUT = 60


def _module_name(path: Path) -> str:
    root = SIM_ROOT if SIM_ROOT in path.parents else REPO
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_in(text: str, package: str) -> set[str]:
    """Every module a source text of ``package`` imports, anywhere in it, as absolute names
    (``from P import N`` counts as P and P.N: N may be a submodule); ``import_module("...")`` too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def imports_of(path: Path) -> set[str]:
    name = _module_name(path)
    return imports_in(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0])


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_import_reader_sees_relative_lazy_and_dynamic_imports() -> None:
    text = ("import os\nfrom xen_vhost_sim import guest\ndef f():\n    from ..device import Device\n"
            "    import importlib\n    importlib.import_module('xen_vhost_sim.host')\n")
    found = imports_in(text, "xen_vhost_master.xen")
    assert {"os", "xen_vhost_sim", "xen_vhost_sim.guest", "xen_vhost_sim.host", "xen_vhost_master.device"} <= found
    assert imports_in("from .xen.kernel import Kernel\n", "xen_vhost_master") >= {"xen_vhost_master.xen.kernel"}
    assert _module_name(SIM_ROOT / SIM / "tools" / "demo.py") == "xen_vhost_sim.tools.demo"


def test_no_daemon_module_imports_the_simulator() -> None:
    files = sorted(DAEMON.rglob("*.py"))
    assert DAEMON / "supervisor.py" in files and DAEMON / "xen" / "kernel.py" in files
    bad = {str(p.relative_to(REPO)): sorted(n for n in imports_of(p) if _within(n, SIM)) for p in files}
    assert {f: names for f, names in bad.items() if names} == {}


def test_the_xen_adapters_import_nothing_of_the_project_but_errors() -> None:
    allowed = ("xen_vhost_master.xen", "xen_vhost_master.errors")
    files = sorted((DAEMON / "xen").rglob("*.py"))
    assert len(files) >= 10
    bad = {str(p.relative_to(REPO)): sorted(n for n in imports_of(p) if _within(n, "xen_vhost_master")
                                          and n != "xen_vhost_master" and not any(_within(n, a) for a in allowed)
                                          or _within(n, "vhost_user"))
           for p in files}
    assert {f: names for f, names in bad.items() if names} == {}


def test_the_simulator_imports_of_the_daemon_only_the_xen_adapters_and_the_platform() -> None:
    allowed = ("xen_vhost_master.xen", "xen_vhost_master.platform")
    tools = SIM_ROOT / SIM / "tools"
    files = sorted(p for p in (SIM_ROOT / SIM).rglob("*.py") if tools not in p.parents)
    assert SIM_ROOT / SIM / "simkernel.py" in files and len(files) >= 15
    bad = {str(p.relative_to(REPO)): sorted(n for n in imports_of(p) if _within(n, "xen_vhost_master")
                                          and n != "xen_vhost_master" and not any(_within(n, a) for a in allowed)
                                          or _within(n, f"{SIM}.tools"))
           for p in files}
    assert {f: names for f, names in bad.items() if names} == {}


# The daemon's rooms (docs/datapath.md, README "What is in the box"): who may not import whom.
# (room, the modules it consists of, what none of them may import, what is allowed inside that)
ROOM_RULES = [
    ("guestmem", ("xen_vhost_master.guestmem",),
     ("xen_vhost_master.datapath", "xen_vhost_master.device", "xen_vhost_master.backend"), ()),
    ("datapath", ("xen_vhost_master.datapath",),
     ("xen_vhost_master.device", "xen_vhost_master.supervisor", "xen_vhost_master.cli", SIM), ()),
    ("backend", ("xen_vhost_master.backend",),
     ("xen_vhost_master.device", "xen_vhost_master.datapath", "xen_vhost_master.supervisor"), ()),
    ("ioreq_server-fastpath", ("xen_vhost_master.ioreq_server", "xen_vhost_master.fastpath"),
     ("xen_vhost_master.device", "xen_vhost_master.datapath", "xen_vhost_master.supervisor"), ()),
    ("transport-models", ("xen_vhost_master.virtio_mmio", "xen_vhost_master.virtio_pci"),
     ("xen_vhost_master", "vhost_user", SIM), ()),
    ("device", ("xen_vhost_master.device",),
     ("xen_vhost_master.datapath", "xen_vhost_master.supervisor", SIM), ("xen_vhost_master.datapath.base",)),
]


def room_violations(modules: tuple[str, ...], never: tuple[str, ...], allowed: tuple[str, ...],
                    sources: dict[str, str] | None = None) -> dict[str, list[str]]:
    """What the modules of a room import that the rule forbids. ``sources``: module name → text,
    read from the tree when not given (a test may hand in a broken source to see the rule bite)."""
    if sources is None:
        sources = {_module_name(p): p.read_text() for p in sorted(DAEMON.rglob("*.py"))}
    bad: dict[str, list[str]] = {}
    for name, text in sources.items():
        if not any(_within(name, m) for m in modules):
            continue
        is_pkg = (DAEMON.parent / (name.replace(".", "/") + "/__init__.py")).is_file()
        found = imports_in(text, name if is_pkg else name.rpartition(".")[0])
        hits = sorted(n for n in found if any(_within(n, f) for f in never)
                      and not any(_within(n, a) for a in allowed) and not any(_within(n, m) for m in modules))
        if hits:
            bad[name] = hits
    return bad


@pytest.mark.parametrize(("modules", "never", "allowed"), [r[1:] for r in ROOM_RULES], ids=[r[0] for r in ROOM_RULES])
def test_each_room_imports_only_downwards(modules: tuple[str, ...], never: tuple[str, ...],
                                          allowed: tuple[str, ...]) -> None:
    assert any(_within(_module_name(p), m) for p in DAEMON.rglob("*.py") for m in modules)  # the room exists
    assert room_violations(modules, never, allowed) == {}


@pytest.mark.parametrize(("modules", "never", "allowed"), [r[1:] for r in ROOM_RULES], ids=[r[0] for r in ROOM_RULES])
def test_a_room_rule_bites_when_broken(modules: tuple[str, ...], never: tuple[str, ...],
                                       allowed: tuple[str, ...]) -> None:
    """Each rule, handed a module of its room that imports what it must not, reports it."""
    target = next(n for n in never if n != SIM)
    module = modules[0] + ".probe" if (DAEMON.parent / modules[0].replace(".", "/")).is_dir() else modules[0]
    broken = {module: f"from __future__ import annotations\nimport {target}\n"}
    assert room_violations(modules, never, allowed, broken) == {module: [target]}


def test_the_device_may_import_the_data_path_base_only() -> None:
    """``from .datapath import shadow`` names the package and its module: both are refused."""
    sources = {"xen_vhost_master.device": "from .datapath.base import DataPath\nfrom .datapath import shadow\n"}
    never, allowed = ROOM_RULES[-1][2], ROOM_RULES[-1][3]
    assert room_violations(("xen_vhost_master.device",), never, allowed, sources) == {
        "xen_vhost_master.device": ["xen_vhost_master.datapath", "xen_vhost_master.datapath.shadow"]}


PROBE = """
import json, sys
{code}
print(json.dumps(sorted(n for n in sys.modules if n == {sim!r} or n.startswith({sim!r} + "."))))
"""


def _sim_modules_after(code: str, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code, sim=SIM)], capture_output=True, text=True,
                         timeout=TIMEOUT, check=True, cwd=REPO, env={**os.environ, **(env or {})})
    return list(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import xen_vhost_master.cli",
    "import runpy\nsys.argv = ['xen-vhost-master', '--help']\ntry:\n"
    "    runpy.run_module('xen_vhost_master', run_name='__main__')\nexcept SystemExit:\n    pass",
    "import xen_vhost_master.cli, xen_vhost_master.supervisor, xen_vhost_master.dispatcher, "
    "xen_vhost_master.backend.blk\nfrom xen_vhost_master.platform import platform_from_env\nplatform_from_env({})",
], ids=["import-cli", "help", "daemon-on-real-platform"])
def test_the_daemon_loads_no_simulator_module(code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XEN_VHOST_SIM"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code, sim=SIM)], capture_output=True, text=True,
                         timeout=TIMEOUT, check=True, cwd=REPO, env=env)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_the_simulator_plugs_in_through_its_entry_point_only_when_asked(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "no-host.sock")
    assert _sim_modules_after(f"from xen_vhost_master.platform import platform_from_env\n"
                              f"platform_from_env({{'XEN_VHOST_SIM': {socket_path!r}}})") != []
    from importlib.metadata import entry_points

    (ep,) = entry_points(group=ENTRY_POINT_GROUP, name=SIM_ENTRY_POINT)
    assert _within(ep.module, SIM)  # the package that provides it names itself; the daemon names none


def test_a_simulator_asked_for_and_not_installed_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: ())
    with pytest.raises(ConfigError, match="no package provides the entry point xen_vhost_master.platforms:sim"):
        platform_from_env({"XEN_VHOST_SIM": "/nonexistent.sock"})
    monkeypatch.setenv("XEN_VHOST_SIM", "/nonexistent.sock")
    assert cli.main(["--domain", "1"]) == 78
    assert "XEN_VHOST_SIM=/nonexistent.sock asks for the simulated Xen host, but no package provides" in capsys.readouterr().err


@pytest.mark.parametrize("simulated", [True, False], ids=["sim", "real"])
@pytest.mark.parametrize(("argv", "logger"), [(["--domain", "web1"], "xen_vhost_master"),
                                             (["watch", "--spawn"], "xen_vhost_master.dispatcher")],
                         ids=["serve", "watch"])
def test_the_daemon_says_at_once_which_platform_it_runs_on(simulated: bool, argv: list[str], logger: str,
                                                           tmp_path: Path) -> None:
    """Nothing answers (no host at the socket, no xenstored, no /dev/xen here): the daemon fails
    (exit 72: no /dev/xen/privcmd, not a dom0), after its first line said where it looked."""
    env = {k: v for k, v in os.environ.items() if k != "XEN_VHOST_SIM"}
    env["XENSTORED_PATH"] = str(tmp_path / "no-xenstored")
    socket_path = str(tmp_path / "no-host.sock")
    if simulated:
        env["XEN_VHOST_SIM"] = socket_path
    out = subprocess.run([sys.executable, "-m", "xen_vhost_master", *argv], capture_output=True,
                         text=True, timeout=TIMEOUT, check=False, cwd=REPO, env=env)
    first = out.stderr.splitlines()[0]
    if simulated:
        assert first == f"INFO {logger}: platform: SIMULATED Xen host at {socket_path} (xen-vhost-sim), not /dev/xen"
    else:
        assert first == f"INFO {logger}: platform: real Xen (/dev/xen)"
    assert out.returncode == 72, out.stderr


def test_the_blk_backend_says_its_platform_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from xen_vhost_master.backend import blk

    socket_path = str(tmp_path / "no-host.sock")
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit):
        blk.main(["--help"], platform_from_env({"XEN_VHOST_SIM": socket_path}))
    assert f"platform: SIMULATED Xen host at {socket_path}" in caplog.text
