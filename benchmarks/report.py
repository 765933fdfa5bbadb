"""Write docs/benchmarks.md from the committed results in benchmarks/results/*.json.

Every figure in the table comes from a results file that a benchmark script wrote after checking
correctness; the goals are the issues' own. Each section embeds its script's plot
(``benchmarks/results/<name>.png``) when there is one. Run after any benchmark:
``python benchmarks/report.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "benchmarks.md"

Row = tuple[str, Callable[[dict], float | None], str, Callable[[float], bool] | None]


def at_least(x: float) -> Callable[[float], bool]:
    return lambda v: v >= x


def at_most(x: float) -> Callable[[float], bool]:
    return lambda v: v <= x


def key(name: str) -> Callable[[dict], float | None]:
    return lambda d: d.get(name)


def ratio(num: str, den: str) -> Callable[[dict], float | None]:
    return lambda d: d[num] / d[den] if d.get(num) and d.get(den) else None


SECTIONS: list[tuple[str, str, str, list[Row]]] = [
    ("control_plane", "Control plane (issue 2)", "8 concurrent client processes against the real daemon", [
        ("lookup_p99_ms", key("lookup_p99_ms"), "≤ 2", at_most(2.0)),
        ("lookup_p50_ms", key("lookup_p50_ms"), "", None),
        ("lookup_ops_per_s", key("lookup_ops_per_s"), "", None),
        ("commit_p99_ms", key("commit_p99_ms"), "report", None),
        ("commit_p50_ms", key("commit_p50_ms"), "", None),
        ("arena_copy_GBps", key("arena_copy_GBps"), "≥ 0.8 × memcpy", None),
        ("memcpy_GBps", key("memcpy_GBps"), "", None),
        ("arena_copy / memcpy", ratio("arena_copy_GBps", "memcpy_GBps"), "≥ 0.8", at_least(0.8)),
    ]),
    ("ssd_tier", "SSD tier and codecs (issue 3)", "real SmolLM2-135M KV", [
        ("lossless_ratio", key("lossless_ratio"), "≥ 1.45", at_least(1.45)),
        ("plain_zstd_ratio", key("plain_zstd_ratio"), "(≈ 1.29)", None),
        ("encode_MBps_per_core", key("encode_MBps_per_core"), "≥ 300", at_least(300)),
        ("decode_MBps_per_core", key("decode_MBps_per_core"), "≥ 700", at_least(700)),
        ("restore_MBps", key("restore_MBps"), "≥ 600", at_least(600)),
        ("disk_write_MBps", key("disk_write_MBps"), "ceiling", None),
        ("disk_read_MBps", key("disk_read_MBps"), "ceiling", None),
        ("fp8_ratio", key("fp8_ratio"), "", None),
        ("fp8_rel_err_k", key("fp8_rel_err_k"), "", None),
        ("fp8_rel_err_v", key("fp8_rel_err_v"), "", None),
        ("int8_ratio", key("int8_ratio"), "", None),
    ]),
    ("kernels", "Triton kernels on the H200 (issue 4)", "Llama-3-8B attention shapes, 1 global + 7 local KV heads", [
        ("decode_speedup_vs_sdpa_128k", key("decode_speedup_vs_sdpa_128k"), "≥ 5.5", at_least(5.5)),
        ("decode_speedup_vs_sdpa_32k", key("decode_speedup_vs_sdpa_32k"), "≥ 4.0", at_least(4.0)),
        ("decode_TBps_128k", key("decode_TBps_128k"), "≥ 3.4", at_least(3.4)),
        ("decode_speedup_vs_flex_128k", key("decode_speedup_vs_flex_128k"), "> 1", lambda v: v > 1),
        ("prefill_speedup_vs_sdpa_32k", key("prefill_speedup_vs_sdpa_32k"), "≥ 5.0", at_least(5.0)),
        ("prefill_speedup_vs_flex_32k", key("prefill_speedup_vs_flex_32k"), "> 1", lambda v: v > 1),
        ("h2d_gather_GBps", key("h2d_gather_GBps"), "≥ 45", at_least(45)),
        ("d2h_gather_GBps", key("d2h_gather_GBps"), "≥ 45", at_least(45)),
        ("rope_shift_TBps", key("rope_shift_TBps"), "≥ 0.8 × copy", None),
        ("fp8_quant_TBps", key("fp8_quant_TBps"), "≥ 0.8 × copy", None),
        ("hbm_copy_TBps", key("hbm_copy_TBps"), "ceiling", None),
        ("h2d_pinned_GBps", key("h2d_pinned_GBps"), "ceiling", None),
        ("rope_shift / copy", ratio("rope_shift_TBps", "hbm_copy_TBps"), "≥ 0.8", at_least(0.8)),
        ("fp8_quant / copy", ratio("fp8_quant_TBps", "hbm_copy_TBps"), "≥ 0.8", at_least(0.8)),
    ]),
]


NOTES = {
    "control_plane": (
        "Why lookup p99 misses 2 ms: eight closed-loop clients and the daemon share two cores. Measured per "
        "128-chunk lookup: 0.22 ms of daemon CPU (aiohttp request handling, the index walk, the JSON answer) "
        "and 0.09 ms of client CPU (kvd's lean Unix-socket HTTP client; `http.client` took 0.20 ms). The "
        "daemon is one event loop, so it serves at most ~4,500 lookups/s; by Little's law eight clients "
        "then wait about 8 / 5,400 s ≈ 1.5 ms on average, and scheduling noise on two shared cores makes "
        "the tail ~2.4 ms. Reaching 2 ms needs either fewer concurrent clients per core or about half the "
        "daemon CPU per request (a binary protocol or a C HTTP server), which was not done. Three runs on a "
        "quiet machine: p99 3.05 / 2.40 / 2.36 ms; arena copy 0.79 / 0.81 / 0.73 × memcpy (the copy "
        "gathers strided K/V blocks of each layer and head; a contiguous memcpy is its ceiling)."),
}


def _fidelity_rows(d: dict) -> list[tuple[str, float | None, str, bool | None]]:
    s = d.get("shipped", {})
    rows: list[tuple[str, float | None, str, bool | None]] = [
        ("mean_kl", s.get("mean_kl"), "≤ 0.02", s.get("mean_kl", 1) <= 0.02),
        ("top1_agreement", s.get("top1_agreement"), "≥ 0.96", s.get("top1_agreement", 0) >= 0.96),
        ("kv_fraction_4k", s.get("kv_fraction_4k"), "≤ 0.5", s.get("kv_fraction_4k", 1) <= 0.5),
    ]
    full, mine = s.get("passkey_acc_full", {}), s.get("passkey_acc_headmap", {})
    for length in sorted(full, key=int):
        rows.append((f"passkey_acc {length}: map (full {full[length]:.3f})", mine.get(length),
                     "≥ full − 0.034", mine.get(length, 0) >= full[length] - 0.034))
    above = d.get("goals", {}).get("kvd_above_every_baseline", {})
    if above:
        rows.append(("budgets where kvd beats every baseline", sum(bool(v) for v in above["value"].values()),
                     f"all {len(above['value'])}", bool(above.get("met"))))
    return rows


def _vllm_rows(d: dict) -> list[tuple[str, float | None, str, bool | None]]:
    rows: list[tuple[str, float | None, str, bool | None]] = []
    for length in ("1024", "2048", "3000", "4096", "1k", "2k", "4k"):
        for mode in ("recompute", "kvd", "example", "prefix_cache"):
            v = d.get(f"ttft_{mode}_{length}_s")
            if v is not None:
                rows.append((f"ttft_{mode}_{length}_s", v, "", None))
    k = next((L for L in ("4096", "4k") if d.get(f"ttft_kvd_{L}_s")), None)
    if k:
        kvd = d[f"ttft_kvd_{k}_s"]
        for mode, goal, ok in (("recompute", "≥ 5", lambda r: r >= 5), ("example", "≥ 2", lambda r: r >= 2)):
            if d.get(f"ttft_{mode}_{k}_s"):
                r = d[f"ttft_{mode}_{k}_s"] / kvd
                rows.append((f"{mode} / kvd at 4K", r, goal, ok(r)))
        if d.get(f"ttft_prefix_cache_{k}_s"):
            r = kvd / d[f"ttft_prefix_cache_{k}_s"]
            rows.append(("kvd / in-engine hit at 4K", r, "≤ 2", r <= 2))
    return rows


def _reuse_rows(fid: dict | None, speed: dict | None) -> list[tuple[str, float | None, str, bool | None]]:
    rows: list[tuple[str, float | None, str, bool | None]] = []
    methods = ("recompute", "kvd", "kvd_sparse_ffn", "naive", "cacheblend", "epic")
    if fid:
        for m in methods:
            for k in (f"acc_{m}", f"top1_{m}"):
                if k in fid:
                    rows.append((k, fid[k], "", None))
        if "acc_kvd" in fid and "acc_recompute" in fid:
            rows.append(("acc_kvd − acc_recompute", fid["acc_kvd"] - fid["acc_recompute"], "≥ −0.02",
                         fid["acc_kvd"] >= fid["acc_recompute"] - 0.02))
        if "acc_kvd" in fid and "acc_cacheblend" in fid:
            rows.append(("acc_kvd − acc_cacheblend", fid["acc_kvd"] - fid["acc_cacheblend"], "≥ 0",
                         fid["acc_kvd"] >= fid["acc_cacheblend"]))
    if speed:
        # Measured keys when the H200 run exists; otherwise the cost model's predictions, labelled so.
        prefix = "" if "ttft_recompute_s" in speed else "predicted_"
        label = "" if not prefix else " (predicted, not measured)"
        for m in methods:
            if f"{prefix}ttft_{m}_s" in speed:
                rows.append((f"ttft_{m}_s{label}", speed[f"{prefix}ttft_{m}_s"], "", None))
        if speed.get(f"{prefix}ttft_recompute_s") and speed.get(f"{prefix}ttft_kvd_sparse_ffn_s"):
            r = speed[f"{prefix}ttft_recompute_s"] / speed[f"{prefix}ttft_kvd_sparse_ffn_s"]
            rows.append((f"recompute / kvd_sparse_ffn{label}", r, "≥ 2.5", None if prefix else r >= 2.5))
        if fid and not prefix:
            # Dominated: some baseline is both faster and more accurate (accuracy from the CPU run).
            base = [m for m in ("recompute", "naive", "cacheblend", "epic") if f"ttft_{m}_s" in speed and f"acc_{m}" in fid]
            for m in ("kvd", "kvd_sparse_ffn"):
                if f"ttft_{m}_s" in speed and f"acc_{m}" in fid:
                    by = [b for b in base if speed[f"ttft_{b}_s"] < speed[f"ttft_{m}_s"] and fid[f"acc_{b}"] > fid[f"acc_{m}"]]
                    rows.append((f"{m} dominated by", ", ".join(by) or "none", "none", not by))
    return rows


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _table(rows) -> list[str]:
    out = ["| figure | measured | goal | met |", "| --- | --- | --- | --- |"]
    for name, value, goal, met in rows:
        v = "—" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        m = "" if met is None else ("yes" if met else "**no**")
        out.append(f"| {name} | {v} | {goal} | {m} |")
    return out


def _where(d: dict) -> str:
    date = d.get("date") or d.get("date_predicted") or d.get("versions", {}).get("date", "")
    machine = d.get("machine") or d.get("device") or d.get("versions", {}).get("gpu", "")
    if "versions" in d:
        v = d["versions"]
        machine = f"{v.get('gpu')}, torch {v.get('torch')}, Triton {v.get('triton')}, CUDA {v.get('cuda')}"
    return f"{date}, {machine}".strip(", ")


def _plot(name: str, title: str) -> list[str]:
    """The section's plot, embedded (a path relative to docs/, so it renders on GitHub and locally)."""
    png = RESULTS / f"{name}.png"
    return [f"![{title}](../benchmarks/results/{png.name})", ""] if png.exists() else []


def render() -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; each script checks",
             "correctness before it times and writes its JSON and PNG there. Goals are the issues' own.", ""]
    for name, title, what, rows in SECTIONS:
        d = _load(name)
        if d is None:
            continue
        lines += [f"## {title}", "", f"{what}. Measured {_where(d)}. Script: `benchmarks/{name}.py`.", ""]
        lines += _table([(n, f(d), g, (ok(f(d)) if ok and f(d) is not None else None)) for n, f, g, ok in rows])
        lines.append("")
        lines += _plot(name, title)
        if name in NOTES:
            lines += [NOTES[name], ""]
    d = _load("fidelity_headmap")
    if d:
        lines += ["## Head map fidelity (issue 5)", "", f"SmolLM2-135M, shipped map `config/heads/smollm2-135m.json`. "
                  f"Measured {_where(d)}. Script: `benchmarks/fidelity_headmap.py`.", ""]
        lines += _table(_fidelity_rows(d)) + [""] + _plot("fidelity_headmap", "Head map fidelity")
    d = _load("vllm_e2e")
    if d:
        lines += ["## vLLM end to end (issue 6)", "", f"Real vLLM (CPU build), SmolLM2-135M. Measured {_where(d)}. "
                  "Script: `benchmarks/vllm_e2e.py`.", ""]
        lines += _table(_vllm_rows(d)) + [""] + _plot("vllm_e2e", "vLLM end to end")
    fid, speed = _load("pi_reuse_fidelity"), _load("pi_reuse_speed")
    if fid or speed:
        where = "; ".join(f"{what}: {w}" for what, x in (("accuracy", fid), ("TTFT", speed)) if x and (w := _where(x)))
        lines += ["## Position-independent chunk reuse (issue 7)", "", f"Measured {where}. Scripts: "
                  "`benchmarks/pi_reuse_fidelity.py`, `benchmarks/pi_reuse_speed.py`.", ""]
        lines += _table(_reuse_rows(fid, speed)) + [""] + _plot("pi_reuse", "Position-independent chunk reuse")
    return "\n".join(lines)


def main() -> None:
    OUT.write_text(render())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
