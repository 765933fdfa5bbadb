"""Position-independent chunk reuse (issue 7): the engine-independent parts.

- ``plan``: segments of a request, their placement in the assembled context, method settings;
- ``select``: which tokens each method recomputes (Sparse FFN, CacheBlend-style, EPIC-style);
- ``chunks``: where chunk entries live (in process, or in the kvd daemon).

The forward pass that uses them is engine-specific: ``kvd.connectors.hf.reuse`` for transformers'
Llama-family models. Imports only torch and numpy (and the daemon client lazily), so the speed
benchmark runs it on a machine without pydantic.
"""
