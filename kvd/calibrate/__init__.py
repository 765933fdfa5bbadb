"""Offline calibration of head maps on a real model: scores, the profiler, its KL probe, recall
refinement, the masked reference attention, the calibration tasks and model loading. The only package
that loads models for kvd itself (``kvctl profile``); nothing in the daemon imports it."""
