"""How guest memory reaches a back-end: the data paths and the one policy choosing among them.

``base`` (what a data path is), ``choose`` (which one a device gets), ``zerocopy`` (the back-end
maps guest RAM itself), ``grant_export`` (grant-based guests), ``shadow`` and ``shadow_pool``
(copying shadow virtqueues). Design: docs/datapath.md. Nothing is imported here: a daemon that
serves no shadow device never loads the shadow engine.
"""
