"""The kvd daemon: wiring and lifecycle (``service``), thin HTTP routes (``api``), Prometheus metrics
(``metrics``) and the systemd protocol (``systemd``). The store does the work; this package serves it."""
