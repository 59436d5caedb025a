"""vhost_user: an asyncio vhost-user protocol library (front-end and back-end roles).

Follows QEMU's docs/interop/vhost-user.rst. Knows nothing about Xen.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
