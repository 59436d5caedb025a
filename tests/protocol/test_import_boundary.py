"""vhost_user must never import xen_vhost_master (docs/design.md §1)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys, pkgutil, importlib
import vhost_user
for m in pkgutil.walk_packages(vhost_user.__path__, "vhost_user."):
    if m.name.endswith("__main__"):
        continue
    importlib.import_module(m.name)
bad = sorted(n for n in sys.modules if n == "xen_vhost_master" or n.startswith("xen_vhost_master."))
print("LOADED", len([n for n in sys.modules if n.startswith("vhost_user")]))
print("BAD", bad)
"""


def test_importing_every_vhost_user_module_never_imports_xen_vhost_master() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60, check=True)
    assert "BAD []" in out.stdout, out.stdout
    assert int(out.stdout.split("LOADED ")[1].split()[0]) >= 15  # the walk really imported the package
