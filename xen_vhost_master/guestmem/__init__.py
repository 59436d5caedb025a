"""Guest RAM as this process maps it, in either role (daemon or back-end): ``foreign`` (privcmd
foreign mappings of RAM) and ``grants`` (gntdev mappings of grant references)."""
