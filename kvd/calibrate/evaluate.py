"""CLI of the fidelity harness.

    python -m kvd.calibrate.evaluate --map config/heads/smollm2-135m.json --task passkey:1024 --task natural:2048 \\
        --prompts 8 [--gen-tokens 16] --model-dir DIR [--cache-dir DIR] [--out results.json]

``--map`` takes a head-map file, ``full`` (every head global), or ``local:WINDOW[:SINK]`` (every head
local: StreamingLLM-style); repeat it to compare several maps on the same prompts. ``--task`` is
``passkey|multikey|natural`` ``:LENGTH`` (tokens). Prints one summary line per (map, task) and writes
per-prompt results and summaries as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvd.core.headmap import HeadMap


def parse_map(spec: str, num_layers: int, num_kv_heads: int) -> HeadMap | None:
    """``full`` → None (plain model); ``local:W[:S]`` → all-local map; else a head-map file."""
    if spec == "full":
        return None
    if spec.startswith("local:"):
        parts = [int(x) for x in spec.split(":")[1:]]
        window, sink = parts[0], (parts[1] if len(parts) > 1 else 4)
        return HeadMap.from_classes(f"all-local-{window}", [[False] * num_kv_heads] * num_layers,
                                    sink=sink, window=window, method="all_local")
    return HeadMap.load(spec)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m kvd.calibrate", description="head-map fidelity harness")
    ap.add_argument("--map", action="append", required=True, help="FILE | full | local:W[:S]")
    ap.add_argument("--task", action="append", required=True, help="passkey|multikey|natural:LENGTH")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--kl-positions", type=int, default=1024)
    ap.add_argument("--gen-tokens", type=int, default=0)
    ap.add_argument("--model-dir", required=True, help="a transformers model directory (the test model's: "
                    "python -m kvd.testing.models path)")
    ap.add_argument("--cache-dir", default=None, help="full-KV reference cache (default: none)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from kvd.calibrate.harness import Harness, make_prompts, result_dict, summarize
    from kvd.calibrate.model import load_causal_lm

    model, tok = load_causal_lm(a.model_dir)
    cfg = model.config
    maps = [(spec, parse_map(spec, cfg.num_hidden_layers, cfg.num_key_value_heads)) for spec in a.map]
    harness = Harness(model, tok, cache_dir=Path(a.cache_dir) if a.cache_dir else None,
                      gen_tokens=a.gen_tokens)
    report: dict = {"maps": a.map, "results": {}, "summary": {}}
    for task_spec in a.task:
        task, length = task_spec.split(":")
        prompts = make_prompts(tok, task, int(length), a.prompts, kl_positions=a.kl_positions)
        for spec, hm in maps:
            rs = [harness.evaluate(p, hm) for p in prompts]
            report["results"].setdefault(spec, []).extend(result_dict(r) for r in rs)
            for name, row in summarize(rs).items():
                report["summary"].setdefault(spec, {})[name] = row
                extra = "".join(f" {k}={row[k]:.3f}" for k in ("acc", "acc_full", "greedy_match", "length_ratio")
                                if k in row)
                print(f"{spec} {name}: mean_kl={row['mean_kl']:.4f} top1={row['top1_agreement']:.3f} "
                      f"kv_fraction={row['kv_fraction']:.3f}{extra}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
