"""What the vLLM connector's worker (``kvd.connectors.vllm.worker``) keeps of one step: its loads
(a lease and the pieces copied through it), its saves (a reservation and the pieces written into it)
and the step's progress."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvd.client.transfer import Lease, Reservation
from kvd.connectors.vllm.copy import Piece
from kvd.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvd.connectors.vllm.sums import LoadSums


@dataclass
class StepLoad:
    spec: LoadSpec
    lease: Lease
    pieces: list[Piece]
    sums: LoadSums | None = None  # checksums taken as the layers are copied (kvd.connectors.vllm.sums)
    starts: list[int] = field(default_factory=list)  # per piece: its chunk's first token in the request


@dataclass
class StepSave:
    spec: SaveSpec
    reservation: Reservation
    pieces: list[Piece]


@dataclass
class StepState:
    plan: StepPlan
    loads: list[StepLoad] = field(default_factory=list)
    saves: list[StepSave] | None = None  # None until the first save_layer of the step
    layers_loaded: set[int] = field(default_factory=set)
    layers_saved: set[int] = field(default_factory=set)
    forward_started: bool = False
    loads_finished: bool = False  # checked, exchanged and released (``_finish_loads``)
    t_load_s: float = 0.0
    t_save_s: float = 0.0
