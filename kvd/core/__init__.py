"""Shared vocabulary of every process: settings, keys and fingerprints, the head map, errors, the
control API's models and the extent layout. Imports nothing else of kvd."""
