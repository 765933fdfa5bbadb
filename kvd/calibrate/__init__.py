"""Offline calibration of head maps on a real model: scores, the profiler, recall refinement, the
masked reference attention and the calibration tasks. The only package that loads models for kvd
itself (``kvctl profile``); nothing in the daemon imports it."""
