"""The transports that ship with graft-trio: ``memory``, ``tcp`` and ``websocket``.

They are found by name through the ``graft_trio.transports`` entry-point group; import them directly only
to pass options (for example a `MemoryNetwork` of one's own).
"""
