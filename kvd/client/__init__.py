"""The engine side of kvd: the control-API client (``client``), the arena mapping (``arena``), the
one lease/reserve transaction (``transfer``), prefix entries (``prefix``) and daemon-failure
handling (``session``). Never imports the daemon, the store or tiers."""
