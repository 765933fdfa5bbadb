"""``benchmarks/results/head_aware.json`` and ``.png``: the one results file of issue 12's three scripts
(``head_aware_daemon.py``: bytes, reload, capacity; ``lossy_vllm.py``: fp8 read by an exact engine;
``head_aware.py``: the Lil guard). Each merges its keys (the others' stay) and redraws the plot from
whatever the file holds."""

from __future__ import annotations

import json
from pathlib import Path

GOALS = {"bytes_4k": 0.5, "bytes_8k": 0.35, "capacity": 1.8, "lil_guard": 0.05}


def merge(path: Path, new: dict) -> dict:
    """Update ``path``'s JSON with ``new`` (keys of other sections stay), written atomically; then the
    plot beside it. Returns the merged document."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update(new)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    plot(doc, path.with_suffix(".png"))
    return doc


def plot(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(17, 4))

    def bars(a, labels, values, goal=None, title="", fmt="{:.3f}"):
        vals = [v if v is not None else 0.0 for v in values]
        a.bar(range(len(vals)), vals, color=["#37a" if v is not None else "#ccc" for v in values])
        for i, v in enumerate(values):
            a.text(i, vals[i], "—" if v is None else fmt.format(v), ha="center", va="bottom", fontsize=8)
        if goal is not None:
            a.axhline(goal, color="k", ls="--", lw=1)
        a.set_xticks(range(len(vals)), labels, fontsize=8)
        a.set_title(title, fontsize=9)

    g = doc.get
    bars(ax[0], ["stored 4K", "loaded 4K", "stored 8K", "loaded 8K"],
         [g("bytes_stored_per_token_ratio_4k"), g("bytes_loaded_per_token_ratio_4k"),
          g("bytes_stored_per_token_ratio_8k"), g("bytes_loaded_per_token_ratio_8k")],
         title="bytes per token / full KV (goals 0.5 at 4K, 0.35 at 8K: dashed 0.5)", goal=GOALS["bytes_4k"])
    ax[0].axhline(GOALS["bytes_8k"], color="k", ls=":", lw=1)
    bars(ax[1], ["exact readers", "capacity mode"], [g("prefix_hit_rate_exact"), g("prefix_hit_rate_capacity")],
         title=f"prefix hit rate, same budget (ratio {g('capacity_hits_per_gb_ratio') or 0:.2f}x, goal 1.8x)")
    bars(ax[2], ["no guard", "guard: restore", "guard: rerun"],
         [g("lil_inflation_noguard"), g("lil_inflation_guard"), g("lil_inflation_guard_rerun")],
         goal=GOALS["lil_guard"], title="Lil: mean length inflation vs full KV (goal with guard 0.05)")
    bars(ax[3], ["KL fp8", "KL lossless ctrl", "top-1 fp8", "top-1 ctrl"],
         [g("lossy_exact_reader_kl"), g("lossy_control_lossless_kl"), g("lossy_exact_reader_top1"),
          g("lossy_control_lossless_top1")], title="exact reader of fp8 cold extents (vLLM)", fmt="{:.4f}")
    fig.suptitle("Head-aware KV through kvd, SmolLM2-135M, shipped map (benchmarks/results/head_aware.json)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
