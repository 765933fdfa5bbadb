"""kvd: a head-aware, tiered KV-cache storage daemon for LLM serving.

The package is layered (ARCHITECTURE.md, "Dependency rules"): ``gpu_kernels`` imports only torch and
triton; ``tiers`` hold bytes; ``policies`` decide from metadata; ``connectors`` run inside engine
processes and talk to the daemon through ``connectors.client`` only.
"""

__version__ = "0.1.0"
