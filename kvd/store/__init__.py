"""The daemon's state and its orchestration: the index of entries (``store``, ``entries``), holds
(``holds``: leases and reservations), room in the arena (``space``), moving extents between adjacent
tiers (``pipeline``), rebuilding the index at start (``recovery``), registered models (``registry``)
and read-only views for kvctl (``reporting``). Tiers hold the bytes, policies decide."""
