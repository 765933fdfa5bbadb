"""The Lil guard on the real SmolLM2 (fp32, CPU): an aggressive head map makes greedy decoding loop,
the guard trips, restores the local heads' full KV, and the continuation is the one of a cache that
kept full KV for the local heads from that point.

The reference is built without any of the adapter's code: transformers' own ``DynamicCache`` (which
keeps every token's KV) decoded under ``kvd.calibrate.masked_attention.apply_head_map`` (the head map
as masks: the map's reference semantics) until it holds the same positions the guarded cache held when
it tripped, then, with the masks removed, decoded on with the same cache: every head, local ones
included, now attends to the full KV — computed under the map before the trip point, exact after it.
Tolerance: max |Δlogit| ≤ 5e-4, as the adapter against the masked reference (test_cache.py).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from kvd.calibrate import tasks
from kvd.calibrate.masked_attention import apply_head_map
from kvd.connectors.hf import cache as hf
from kvd.connectors.hf.guard import GuardConfig, generate
from kvd.core.headmap import HeadMap
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.model
ATOL = 5e-4
AFTER = 24  # tokens compared after the trip
# The test's own guard settings (not the shipped defaults): it tests the mechanism, not the thresholds.
GUARD = GuardConfig(window=64, ratio=3.0, stop_if_still_looping=False)


def aggressive_map() -> HeadMap:
    """Every KV head local (sink 4, window 32) but a seeded 10 % (8 of 90): decoding loses its thread."""
    g = torch.Generator().manual_seed(0)
    return HeadMap.from_classes("smollm2-aggressive", (torch.rand(30, 3, generator=g) < 0.1).tolist(), sink=4,
                                window=32)


@pytest.fixture(scope="module")
def prompt(smollm2_fp32) -> torch.Tensor:
    _, tok = smollm2_fp32
    rng = random.Random(0)
    name, code = rng.choice(tasks._NAMES), rng.randint(1000, 9999)
    words = tasks.prose(0, 350).split()
    cut = len(words) // 3
    text = " ".join(words[:cut] + [f"The secret code for {name} is {code}."] + words[cut:])
    msg = [{"role": "user", "content": f"{text}\n\nWhat is the secret code for {name}? Give the code, then retell "
                                       "the story above in detail."}]
    return tok(tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True), return_tensors="pt")["input_ids"]


def guarded(model, ids: torch.Tensor, max_new: int, **attach):
    with torch.no_grad():
        cache = hf.attach(model, head_map=aggressive_map(), guard=GUARD, **attach)
        r = model.generate(ids, past_key_values=cache, max_new_tokens=max_new, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    hf.detach(model)
    return r.sequences[0, ids.shape[1]:].tolist(), [s[0] for s in r.scores], cache


def reference(model, ids: torch.Tensor, switch_at: int, max_new: int):
    """Greedy decoding with a cache that keeps every head's full KV: masked by the map until the cache
    holds ``switch_at`` positions, unmasked from then on (see the module docstring)."""
    dc, toks, scores = DynamicCache(), [], []
    nxt = ids
    with torch.no_grad():
        for _ in range(max_new):
            if dc.get_seq_length() < switch_at:
                with apply_head_map(model, aggressive_map()):
                    logits = model(nxt, past_key_values=dc).logits[0, -1]
            else:
                logits = model(nxt, past_key_values=dc).logits[0, -1]
            scores.append(logits)
            toks.append(int(logits.argmax()))
            nxt = torch.tensor([[toks[-1]]])
    return toks, scores


@pytest.fixture(scope="module")
def tripped(smollm2_fp32, prompt):
    """The guarded run without a daemon (every trimmed page kept in the host stash)."""
    model, _ = smollm2_fp32
    try:
        toks, scores, cache = guarded(model, prompt, 120)
    finally:
        hf.detach(model)
    return toks, scores, cache.guard.stats


def test_aggressive_map_loops_and_the_guard_trips_and_restores(tripped, prompt):
    toks, _, st = tripped
    assert st.trips == 1 and st.restores == 1 and st.stops == 0 and st.restore_failures == 0
    assert st.trip_reason.startswith("ratio") and st.trip_generated < 120 - AFTER
    assert st.trip_position == prompt.shape[1] + st.trip_generated - 1
    assert st.restored_from_stash > 0 and st.restored_from_daemon == 0
    assert st.tokens_head_aware == st.trip_generated - 1 and st.tokens_exact == len(toks) - st.trip_generated
    gen = toks[: st.trip_generated]
    assert len(set(gen[-GUARD.window:])) < GUARD.window // 3  # a loop: few distinct tokens in the window


def test_after_restore_the_continuation_equals_full_kv_decoding_from_that_point(model, prompt, tripped):
    toks, scores, st = tripped
    n = st.trip_generated + AFTER
    ref_toks, ref_scores = reference(model, prompt, st.trip_position, n)
    assert toks[:n] == ref_toks
    gap = max(float((a - b).abs().max()) for a, b in zip(scores[:n], ref_scores))
    assert gap <= ATOL, gap
    # and the restore is no no-op: decoding on under the map gives other logits from the trip on
    masked_toks, masked_scores = reference(model, prompt, 1 << 30, st.trip_generated + 1)
    assert masked_toks[: st.trip_generated] == toks[: st.trip_generated]
    assert float((masked_scores[-1] - scores[st.trip_generated]).abs().max()) > 100 * ATOL


def test_restore_through_the_daemon_leases_the_prompts_local_extents(model, prompt, tripped, tmp_path):
    """With a daemon, the prompt's stored chunks come back from it (only the ``local`` class is
    leased) and the stash keeps only the rest; the output is the stash-only run's, bit for bit."""
    toks, scores, st = tripped
    d = DaemonProc(tmp_path, env_extra={"KVD_KEYS__CHUNK_TOKENS": "64"}).start()
    try:
        with d.client() as client:
            got, got_scores, cache = guarded(model, prompt, len(toks), client=client, namespace="lil")
    finally:
        d.kill()
    g = cache.guard.stats
    assert g.restores == 1 and g.trip_position == st.trip_position
    assert g.restored_from_daemon == prompt.shape[1] // 64 * 64
    assert 0 < g.restored_from_stash < st.restored_from_stash
    assert got == toks and all(torch.equal(a, b) for a, b in zip(got_scores, scores))


@pytest.mark.parametrize("action", ["stop", "rerun"])
def test_stop_and_a_rerun_under_plain_generate_end_it_at_the_trip(model, prompt, tripped, action):
    """``stop`` ends ``generate`` at the trip; so does ``rerun`` under a plain ``model.generate``, which
    cannot take tokens back (the rerun stays due: ``kvd.connectors.hf.generate`` carries it out)."""
    _, _, st = tripped
    with torch.no_grad():
        cache = hf.attach(model, head_map=aggressive_map(), guard=GuardConfig(window=64, ratio=3.0, action=action))
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=120, do_sample=False,
                             stopping_criteria=[cache.guard])
    assert out.shape[1] - prompt.shape[1] == st.trip_generated
    assert cache.guard.stats.restores == 0 and cache.guard.stopped
    if action == "stop":
        assert cache.guard.stats.stops == 1
    else:
        assert cache.guard.rerun_due and cache.guard.stats.reruns == 0


def test_rerun_action_returns_what_full_kv_decodes(model, prompt, tripped, tmp_path):
    """``action="rerun"`` through ``hf.generate``: the guard trips where the restore run did, the request
    is decoded again with every head global, and the output is an unmapped cache's, bit for bit. With a
    daemon, the rerun is an exact reader: it stores exact prefix entries, which the next exact cache loads."""
    toks, _, st = tripped
    n = st.trip_generated + AFTER
    with torch.no_grad():
        full = model.generate(prompt, past_key_values=hf.attach(model), max_new_tokens=n, do_sample=False)
        d = DaemonProc(tmp_path, env_extra={"KVD_KEYS__CHUNK_TOKENS": "64"}).start()
        try:
            with d.client() as client:
                cfg = GuardConfig(window=64, ratio=3.0, action="rerun")
                cache = hf.attach(model, head_map=aggressive_map(), client=client, namespace="lil", guard=cfg)
                out = generate(model, prompt, cache, max_new_tokens=n, do_sample=False)
                loaded = cache.exact().load_prefix(prompt)
        finally:
            d.kill()
    g = cache.guard.stats
    assert g.trips == 1 and g.reruns == 1 and g.restores == 0 and g.stops == 0
    assert g.trip_generated == st.trip_generated and g.tokens_head_aware == st.trip_generated - 1
    assert torch.equal(out, full) and g.tokens_exact == out.shape[1] - prompt.shape[1]
    assert out[0, prompt.shape[1]:].tolist()[: st.trip_generated] != toks[: st.trip_generated]  # not a no-op
    assert loaded == prompt.shape[1] // 64 * 64
