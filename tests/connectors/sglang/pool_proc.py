"""One SGLang host pool + HiCache controller in a process of its own (``python -m`` this module).

    python -m tests.connectors.sglang.pool_proc store SOCKET LAYOUT SEED NUM_PAGES OUT.pt
    python -m tests.connectors.sglang.pool_proc load  SOCKET LAYOUT SEED NUM_PAGES OUT.pt

``store`` fills NUM_PAGES pages with random KV and backs them up through the controller; ``load``
prefetches the same prompt (tokens from SEED) through the controller. Both save
``{"tokens": n, "pages": [num_pages, L, 2, H, P, D]}``: the pages they stored or loaded, in kvd's
canonical order (so pools of different layouts compare).
"""

from __future__ import annotations

import sys

import torch

from kvd.connectors.sglang.pages import HostPages
from tests.connectors.sglang.conftest import extra_config
from tests.connectors.sglang.sglang_env import Controller, fill_random, make_pool, page_keys

P = 64


def main(mode: str, socket: str, layout: str, seed: int, num_pages: int, out: str) -> None:
    toks = torch.randint(3, 49000, (num_pages * P,), generator=torch.Generator().manual_seed(seed)).tolist()
    c = Controller(make_pool(layout, num_pages=num_pages, page_size=P), extra_config(socket))
    try:
        if mode == "store":
            idx = c.pool.alloc(num_pages * P)
            fill_random(c.pool, idx, seed)
            n = c.backup(idx, toks, page_keys(toks, P))
        else:
            n, idx = c.prefetch(toks)
        pages = HostPages(c.pool)
        starts = [] if idx is None else idx[::P].tolist()
        torch.save({"tokens": n, "pages": torch.stack([pages.kv(s).clone() for s in starts]) if starts else None},
                   out)
    finally:
        c.close()


if __name__ == "__main__":
    mode, socket, layout, seed, num_pages, out = sys.argv[1:7]
    main(mode, socket, layout, int(seed), int(num_pages), out)
