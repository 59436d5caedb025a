"""Thin adapters over /dev/xen/{privcmd,evtchn,gntdev,xenbus}: the only place with ioctl/mmap."""
