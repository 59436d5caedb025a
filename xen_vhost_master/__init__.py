"""xen-vhost-master: serve Xen guests' virtio-mmio devices with vhost-user back-ends."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
