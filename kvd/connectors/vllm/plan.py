"""The step plan: what the scheduler side of the vLLM connector tells each worker to load and store.

Picklable value types only, the contract between ``kvd.connectors.vllm.scheduler`` (which builds a
``StepPlan`` per step from vLLM's scheduler output) and ``kvd.connectors.vllm.worker`` (which carries it
out); vLLM ships it to the workers inside ``KvdConnectorMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class LoadSpec:
    """Load tokens ``[start, end)`` of request ``req_id`` from chunks ``first_chunk...`` (``hashes``)."""

    req_id: str
    namespace: str
    first_chunk: int
    hashes: tuple[str, ...]
    start: int
    end: int
    block_ids: tuple[int, ...]  # vLLM blocks of tokens [0, end) at least (block 0 of the request first)
    last_tokens: int = 0  # > 0: the last hash is a tail entry of this many tokens (else a full chunk)
    epoch: int = 0  # the request's load-error epoch when this was planned (see ``SaveSpec.epoch``)


@dataclass(slots=True, frozen=True)
class SaveSpec:
    """Store chunks ``first_chunk...`` (``hashes``) of request ``req_id``, computed by this step."""

    req_id: str
    namespace: str
    first_chunk: int
    hashes: tuple[str, ...]
    block_ids: tuple[int, ...]
    prompt_tokens: int  # the sequence's length, for the daemon's placement policy
    last_tokens: int = 0  # > 0: the last hash is a tail entry of this many tokens (else a full chunk)
    # Per entry (as ``hashes``): (key, tokens) of its block-aligned proper prefixes, registered with it.
    aliases: tuple[tuple[tuple[str, int], ...], ...] = ()
    # How many times the scheduler had learnt of failed loads of this request when it planned this save.
    # A worker whose load of the request failed drops its saves of that epoch or older: under async
    # scheduling the next step is planned, and its KV computed over the blocks that were not filled,
    # before the scheduler hears of the failure (``kvd.connectors.vllm.worker``).
    epoch: int = 0


def entry_sizes(hashes: tuple[str, ...], chunk_tokens: int, last_tokens: int) -> list[int]:
    """Tokens of each entry of a ``LoadSpec`` / ``SaveSpec``: whole chunks, the last one possibly a tail."""
    sizes = [chunk_tokens] * len(hashes)
    if last_tokens and sizes:
        sizes[-1] = last_tokens
    return sizes


@dataclass(slots=True, frozen=True)
class StepPlan:
    loads: tuple[LoadSpec, ...] = ()
    saves: tuple[SaveSpec, ...] = ()
    finished: tuple[str, ...] = ()  # requests vLLM finished since the last plan: workers forget them
    heard: tuple[int, ...] = ()  # failed blocks the scheduler learnt of since the last plan (on_load_errors)
    guarded: tuple[int, ...] = ()  # failed blocks not recomputed yet: saves reading them are dropped
