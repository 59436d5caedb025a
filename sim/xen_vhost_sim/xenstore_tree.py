"""The simulated xenstored's data model: a node tree with permissions, transactions and quotas (pure).

No I/O: operations take the acting domid, return values or raise :class:`XenstoreError` with the errno
real xenstored (``tools/xenstored/core.c``, ``transaction.c``) would answer, and report the
:class:`Change` records that fire watches. The socket server is ``sim.xenstored``.

Semantics modelled (C xenstored 4.17+):

* Nodes carry a value, a child list (insertion order) and permissions ``[owner+default, domid+perm…]``.
  dom0 is privileged; the owner has full access; others get their ACL entry or the default.
* A missing node answers ENOENT only if its nearest existing ancestor is readable, else EACCES
  (``errno_from_parents``). Creating a node needs write access on the nearest existing ancestor; missing
  parents are created implicitly and inherit the parent's permissions, owned by the creator if it is
  unprivileged (``construct_node``).
* ``rm`` of a missing node whose parent exists succeeds; ``rm /`` is EINVAL.
* Transactions work on a snapshot; every node read or written is recorded with its generation, and
  commit fails with EAGAIN if any of them changed meanwhile (per-node generation check as in
  ``transaction.c``). Watch events of a transaction are produced at commit only.
* Quotas for unprivileged domains: nodes per domain and value size (ENOSPC), watches per domain (E2BIG),
  transactions per connection (ENOSPC).
"""

from __future__ import annotations

import errno
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from xen_vhost_master.xen.xenstore_wire import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_REL_PATH_MAX,
    XenstoreError,
    XsAccess,
    XsPerm,
    xenstore_error,
)

__all__ = [
    "XenstoreQuota",
    "Node",
    "Change",
    "Transaction",
    "Store",
    "NodeAccess",
    "SPECIAL_WATCHES",
    "domain_path",
    "is_child",
    "watch_event_path",
]

# Special watch nodes fired by the hypervisor side (xs_wire.h comments, xenstored domain.c).
SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")
# xenstored core.c valid_chars(): the characters a node name may contain.
_VALID_PATH = re.compile(r"[A-Za-z0-9\-/_@]+")


@dataclass(frozen=True)
class XenstoreQuota:
    """Limits applied to unprivileged domains (defaults of C xenstored: quota_nb_entry_per_domain=1000,
    quota_max_entry_size=2048, quota_nb_watch_per_domain=128, quota_max_transaction=10)."""

    max_nodes_per_domain: int = 1000
    max_entry_size: int = 2048
    max_watches_per_domain: int = 128
    max_transactions_per_connection: int = 10


@dataclass(frozen=True)
class Node:
    value: bytes
    perms: tuple[XsPerm, ...]
    children: tuple[str, ...]
    gen: int


@dataclass(frozen=True)
class Change:
    """A modification that fires watches: ``path`` changed; ``recursive`` if its subtree was removed.

    ``perms`` are the node's permissions at the time (a watcher only hears of nodes it may read);
    ``removed`` gives the old permissions of each removed descendant.
    """

    path: str
    perms: tuple[XsPerm, ...]
    recursive: bool = False
    removed: Mapping[str, tuple[XsPerm, ...]] = field(default_factory=dict)


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def is_child(child: str, parent: str) -> bool:
    """True if ``child`` is ``parent`` or below it."""
    return child == parent or parent == "/" or child.startswith(parent + "/")


def watch_event_path(watch_abs: str, change: Change) -> tuple[str, tuple[XsPerm, ...]] | None:
    """The absolute path reported to a watch on ``watch_abs`` for ``change`` (and the perms that
    decide whether the watcher may hear of it), or None if the watch does not fire."""
    if change.path.startswith("@") or watch_abs.startswith("@"):
        return (change.path, change.perms) if watch_abs == change.path else None
    if is_child(change.path, watch_abs):
        return change.path, change.perms
    if change.recursive and is_child(watch_abs, change.path):
        return watch_abs, change.removed.get(watch_abs, change.perms)
    return None


def access_for(domid: int, perms: tuple[XsPerm, ...], privileged: bool) -> tuple[bool, bool, bool]:
    """(read, write, owner) of ``domid`` on a node with ``perms`` (core.c perm_for_conn)."""
    if privileged or perms[0].domid == domid:
        return True, True, True
    access = perms[0].access
    for p in perms[1:]:
        if p.domid == domid:
            access = p.access
            break
    return access.can_read, access.can_write, False


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


class Transaction:
    """A snapshot of the store for one transaction of one connection."""

    def __init__(self, tx_id: int, domid: int, nodes: dict[str, Node]) -> None:
        self.tx_id = tx_id
        self.domid = domid
        self.nodes = nodes
        self.accessed: dict[str, int | None] = {}
        self.written: set[str] = set()
        self.changes: list[Change] = []


class NodeAccess:
    """Operations on a node dict (the live store's or a transaction's) acting as ``domid``."""

    def __init__(self, store: Store, domid: int, tx: Transaction | None = None) -> None:
        self.store = store
        self.domid = domid
        self.privileged = store.is_privileged(domid)
        self.tx = tx
        self.nodes = tx.nodes if tx is not None else store.nodes
        self.changes: list[Change] = tx.changes if tx is not None else []

    # ---- helpers ------------------------------------------------------------------------------

    def canonical(self, path: str) -> str:
        """Absolute, validated node path (relative paths are under the domain's home)."""
        if not path:
            raise XenstoreError(errno.EINVAL, "empty path")
        if not path.startswith("/"):
            if len(path.encode()) > XENSTORE_REL_PATH_MAX:
                raise XenstoreError(errno.EINVAL, "relative path too long", path=path)
            path = f"{domain_path(self.domid)}/{path}"
        if (
            len(path.encode()) > XENSTORE_ABS_PATH_MAX
            or not _VALID_PATH.fullmatch(path)
            or "//" in path
            or (path.endswith("/") and path != "/")
            or "@" in path
        ):
            raise XenstoreError(errno.EINVAL, "invalid path", path=path)
        return path

    def _get(self, path: str) -> Node | None:
        node = self.nodes.get(path)
        if self.tx is not None and path not in self.tx.accessed:
            self.tx.accessed[path] = node.gen if node is not None else None
        return node

    def _put(self, path: str, node: Node | None) -> None:
        self._get(path)  # record the pre-image generation
        if node is None:
            self.nodes.pop(path, None)
        else:
            self.nodes[path] = node
        if self.tx is not None:
            self.tx.written.add(path)

    def _missing(self, path: str) -> XenstoreError:
        """ENOENT if the nearest existing ancestor is readable, else EACCES (errno_from_parents)."""
        anc = path
        while anc != "/":
            anc = _parent(anc)
            node = self._get(anc)
            if node is not None:
                readable = access_for(self.domid, node.perms, self.privileged)[0]
                return xenstore_error(errno.ENOENT if readable else errno.EACCES, path=path)
        return xenstore_error(errno.ENOENT, path=path)

    def _readable(self, path: str) -> Node:
        node = self._get(path)
        if node is None:
            raise self._missing(path)
        if not access_for(self.domid, node.perms, self.privileged)[0]:
            raise xenstore_error(errno.EACCES, path=path)
        return node

    def _owned_count(self) -> int:
        return sum(1 for n in self.nodes.values() if n.perms[0].domid == self.domid)

    def _create(self, path: str, value: bytes) -> None:
        missing = [path]
        anc = _parent(path)
        while (anc_node := self._get(anc)) is None:
            missing.append(anc)
            anc = _parent(anc)
        if not access_for(self.domid, anc_node.perms, self.privileged)[1]:
            raise xenstore_error(errno.EACCES, path=path)
        quota = self.store.quota
        if not self.privileged and self._owned_count() + len(missing) > quota.max_nodes_per_domain:
            raise XenstoreError(errno.ENOSPC, "node quota exceeded", path=path)
        parent_path, parent = anc, anc_node
        for p in reversed(missing):
            perms = parent.perms
            if not self.privileged:
                perms = (XsPerm(self.domid, perms[0].access), *perms[1:])
            gen = self.store.next_gen()
            self._put(parent_path, replace(parent, children=(*parent.children, _basename(p)), gen=gen))
            node = Node(value if p == path else b"", perms, (), gen)
            self._put(p, node)
            parent_path, parent = p, node
        self.changes.append(Change(path, parent.perms))

    # ---- operations ---------------------------------------------------------------------------

    def read(self, path: str) -> bytes:
        return self._readable(self.canonical(path)).value

    def directory(self, path: str) -> list[str]:
        return list(self._readable(self.canonical(path)).children)

    def directory_generation(self, path: str) -> tuple[int, list[str]]:
        node = self._readable(self.canonical(path))
        return node.gen, list(node.children)

    def get_perms(self, path: str) -> list[XsPerm]:
        return list(self._readable(self.canonical(path)).perms)

    def write(self, path: str, value: bytes) -> None:
        path = self.canonical(path)
        if not self.privileged and len(value) > self.store.quota.max_entry_size:
            raise XenstoreError(errno.ENOSPC, "value larger than the entry quota", path=path)
        node = self._get(path)
        if node is None:
            self._create(path, value)
            return
        if not access_for(self.domid, node.perms, self.privileged)[1]:
            raise xenstore_error(errno.EACCES, path=path)
        self._put(path, replace(node, value=value, gen=self.store.next_gen()))
        self.changes.append(Change(path, node.perms))

    def mkdir(self, path: str) -> None:
        path = self.canonical(path)
        node = self._get(path)
        if node is None:
            self._create(path, b"")
        elif not access_for(self.domid, node.perms, self.privileged)[1]:
            raise xenstore_error(errno.EACCES, path=path)  # get_node(..., XS_PERM_WRITE) in do_mkdir

    def rm(self, path: str) -> None:
        path = self.canonical(path)
        if path == "/":
            raise XenstoreError(errno.EINVAL, "cannot remove /", path=path)
        node = self._get(path)
        if node is None:
            parent = self._get(_parent(path))
            if parent is not None and access_for(self.domid, parent.perms, self.privileged)[0]:
                return  # "Didn't exist already?  Fine, if parent exists."
            raise self._missing(path)
        if not access_for(self.domid, node.perms, self.privileged)[1]:
            raise xenstore_error(errno.EACCES, path=path)
        removed: dict[str, tuple[XsPerm, ...]] = {}
        stack = [path]
        while stack:
            p = stack.pop()
            n = self._get(p)
            if n is None:
                continue
            removed[p] = n.perms
            stack.extend(f"{p}/{c}" if p != "/" else f"/{c}" for c in n.children)
            self._put(p, None)
        ppath = _parent(path)
        parent_node = self._get(ppath)
        if parent_node is not None:
            name = _basename(path)
            kids = tuple(c for c in parent_node.children if c != name)
            self._put(ppath, replace(parent_node, children=kids, gen=self.store.next_gen()))
        self.changes.append(Change(path, node.perms, recursive=True, removed=removed))

    def set_perms(self, path: str, perms: list[XsPerm]) -> None:
        path = self.canonical(path)
        if not perms:
            raise XenstoreError(errno.EINVAL, "empty permission list", path=path)
        node = self._get(path)
        if node is None:
            raise self._missing(path)
        _, can_write, owner = access_for(self.domid, node.perms, self.privileged)
        if not (can_write and owner):
            raise xenstore_error(errno.EACCES, path=path)
        if not self.privileged and perms[0].domid != node.perms[0].domid:
            raise XenstoreError(errno.EPERM, "unprivileged domains may not change the owner", path=path)
        self._put(path, replace(node, perms=tuple(perms), gen=self.store.next_gen()))
        self.changes.append(Change(path, tuple(perms)))


class Store:
    """The live tree, the introduced domains and the generation counter."""

    def __init__(self, quota: XenstoreQuota | None = None, privileged: frozenset[int] = frozenset({0})) -> None:
        self.quota = quota or XenstoreQuota()
        self.privileged = privileged
        self._gen = itertools.count(1)
        root_perms = (XsPerm(0, XsAccess.NONE),)
        self.nodes: dict[str, Node] = {
            "/": Node(b"", root_perms, ("local",), 0),
            "/local": Node(b"", root_perms, ("domain",), 0),
            "/local/domain": Node(b"", root_perms, (), 0),
        }
        self.introduced: set[int] = {0}
        self.special_perms: dict[str, tuple[XsPerm, ...]] = {name: root_perms for name in SPECIAL_WATCHES}

    def is_privileged(self, domid: int) -> bool:
        return domid in self.privileged

    def next_gen(self) -> int:
        return next(self._gen)

    def access(self, domid: int, tx: Transaction | None = None) -> NodeAccess:
        return NodeAccess(self, domid, tx)

    def begin(self, tx_id: int, domid: int) -> Transaction:
        return Transaction(tx_id, domid, dict(self.nodes))

    def commit(self, tx: Transaction) -> list[Change]:
        """Apply ``tx``; XenstoreConflict (EAGAIN) if anything it used changed since it started."""
        for path, gen in tx.accessed.items():
            live = self.nodes.get(path)
            if (live.gen if live is not None else None) != gen:
                raise xenstore_error(errno.EAGAIN, op="TRANSACTION_END", path=path)
        for path in tx.written:
            node = tx.nodes.get(path)
            if node is None:
                self.nodes.pop(path, None)
            else:
                self.nodes[path] = replace(node, gen=self.next_gen())
        return list(tx.changes)

    def introduce(self, domid: int) -> Change:
        self.introduced.add(domid)
        return Change("@introduceDomain", self.special_perms["@introduceDomain"])

    def release(self, domid: int) -> Change:
        if domid not in self.introduced:
            raise xenstore_error(errno.ENOENT, op="RELEASE", path=str(domid))
        self.introduced.discard(domid)
        return Change("@releaseDomain", self.special_perms["@releaseDomain"])
