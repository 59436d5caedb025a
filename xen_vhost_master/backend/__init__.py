"""The other end of the socket: a kit for vhost-user back-ends on a Xen host (``mapper``: XEN_MMAP
regions mapped for a ``vhost_user`` device; ``blk``: the project's RAM disk using it)."""
