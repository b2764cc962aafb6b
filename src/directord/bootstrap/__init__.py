"""``directord bootstrap``: set hosts up over SSH from Directord-style catalogs.

:mod:`.catalog` reads and checks the catalog files (with file and line for
every error) and turns them into one :class:`~.catalog.Host` per target;
:mod:`.ssh` runs each host's steps over asyncssh, the server hosts first and
one at a time, then the clients side by side.
"""
