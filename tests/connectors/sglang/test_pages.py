"""``HostPages`` and ``BackendSettings`` on SGLang's real host pool class (no daemon)."""

from __future__ import annotations

import pytest
import torch

from kvd.connectors.sglang.pages import SUPPORTED, HostPages
from kvd.connectors.sglang.settings import BackendSettings
from kvd.core.errors import ConfigError
from tests.connectors.sglang.sglang_env import fill_random, make_pool

P = 16


def documented(pool, start: int, layer: int, kv: int, h: int, t: int, d: int):
    """Element (layer, K/V, head, token, dim) of the page at slot ``start``, indexed as SGLang's table of
    ``kv_buffer`` shapes says (mha.py ``init_kv_buffer``; ENGINES.md §2.3)."""
    b, s = pool.kv_buffer, start + t
    return {"layer_first": lambda: b[kv, layer, s, h, d], "page_first": lambda: b[kv, s, layer, h, d],
            "page_first_direct": lambda: b[kv, start // P, layer, t, h, d],
            "page_head": lambda: b[kv, start // P, h, t, layer, d]}[pool.layout]()


@pytest.mark.parametrize("layout", SUPPORTED)
def test_page_view_puts_each_element_where_sglang_keeps_it(sglang_version, layout):
    pool = make_pool(layout, num_pages=4, page_size=P, layers=5, heads=3, head_dim=8)
    idx = pool.alloc(2 * P)
    fill_random(pool, idx, seed=3)
    pages = HostPages(pool)
    start = idx[P].item()
    view = pages.kv(start)
    assert view.shape == (5, 2, 3, P, 8)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        layer, kv, h, t, d = (int(torch.randint(n, (1,), generator=g)) for n in (5, 2, 3, P, 8))
        got = view[layer, kv, h, t, d].view(torch.int16)
        assert got == documented(pool, start, layer, kv, h, t, d).view(torch.int16)


@pytest.mark.parametrize("layout", SUPPORTED)
def test_flat_page_view_matches_the_page_view(sglang_version, layout):
    """SGLang's own flattening (``get_data_page``, what its older get/set API passes) read back by
    ``flat_kv`` gives the same [L, 2, H, P, D] as the in-pool view."""
    pool = make_pool(layout, num_pages=4, page_size=P, layers=5, heads=3, head_dim=8)
    idx = pool.alloc(P)
    fill_random(pool, idx, seed=5)
    pages = HostPages(pool)
    flat = pool.get_data_page(idx[0].item(), flat=True)
    assert torch.equal(pages.flat_kv(flat).view(torch.int16), pages.kv(idx[0].item()).view(torch.int16))


def test_unsupported_layout_is_refused_naming_it(sglang_version):
    pool = make_pool("page_unified", num_pages=4, page_size=P, layers=5, heads=3, head_dim=8)
    with pytest.raises(ConfigError, match=r"'page_unified' is not supported.*layer_first, page_first, "
                                          r"page_first_direct, page_head"):
        HostPages(pool)


def test_page_starts_refuses_unaligned_indices(sglang_version):
    pages = HostPages(make_pool("page_first", num_pages=4, page_size=P, layers=5, heads=3, head_dim=8))
    assert pages.page_starts(torch.arange(P, 3 * P), 2) == [P, 2 * P]
    with pytest.raises(ValueError, match="not page-aligned"):
        pages.page_starts(torch.arange(1, 1 + P), 1)
    with pytest.raises(ValueError, match="for 2 pages"):
        pages.page_starts(torch.arange(P), 2)


def test_settings_let_sglang_keys_through_and_refuse_typos():
    s = BackendSettings.parse({"backend_name": "kvd", "module_path": "m", "class_name": "C", "interface_v1": 1,
                               "prefetch_threshold": 256, "socket": "/x.sock", "namespace": "prod"})
    assert (s.socket, s.namespace, s.verify_checksums) == ("/x.sock", "prod", True)
    with pytest.raises(ConfigError, match="sockett"):
        BackendSettings.parse({"sockett": "/x.sock"})
