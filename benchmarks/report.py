"""Comparison tables from a pytest-benchmark JSON file, in the terminal and in ``benchmarks/REPORT.md``
with PNG plots (stdlib, plus matplotlib for the plots: without it the report says so and goes on).

    python -m benchmarks.report [benchmarks/results/latest.json] [--stat median|min]
                                [--out benchmarks/REPORT.md] [--results benchmarks/results]

REPORT.md: the machine and its measured rates, the targets, the end-to-end table (``end_to_end``
groups, contract in benchmarks/README.md), plots (written to ``<results>/plots/``), one table per
family (providers x cases), the GPU tables (``<results>/gpu-*.md``) and every skipped benchmark
with its reason (``machine_info["htc_skipped"]``, recorded by benchmarks/conftest.py).

Per group (``benchmark.group``), one row per provider (``extra_info["provider"]``): median time,
``peer / htc`` (how many times faster our kernel "htc" is than that row; > 1 means htc wins), the
roofline floor and time/floor, peak extra memory and threads. Then the targets attached to the
htc rows (``extra_info["targets"]``), each marked OK or MISS:

    {"kind": "speedup", "peer": NAME, "min": X}      peer_median / htc_median >= X
        with "paired": true: the htc row's own interleaved measurement instead,
        extra_info["paired"][NAME]["ratio"] (median of per-pair peer/htc round times) >= X
        (NAME need not have a row of its own: e.g. our own kernel in another dtype or build)
    {"kind": "floor", "max": X}                       htc_median / floor_ms <= X
    {"kind": "mem_growth", "vs_group": G, "max": X}   htc peak_extra_mem_bytes here / in G <= X

Ratios and targets use the median by default; ``--stat min`` uses each row's fastest round instead
(more robust when other processes steal the CPU: interference only ever adds time).
Exit status 0 even when a target is missed (the report informs; tests assert correctness).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "results" / "latest.json"
DEFAULT_OUT = HERE / "REPORT.md"
OURS = "htc"
STAT = "median_ms"  # the statistic ratios and targets use (--stat)


def _mem(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def load(path: Path) -> tuple[dict, dict[str, list[dict]]]:
    data = json.loads(path.read_text())
    groups: dict[str, list[dict]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        groups.setdefault(bench.get("group") or bench["name"], []).append(
            {
                "name": bench["name"],
                "provider": info.get("provider", bench["name"]),
                "median_ms": bench["stats"]["median"] * 1e3,
                "min_ms": bench["stats"]["min"] * 1e3,
                "iqr_ms": bench["stats"]["iqr"] * 1e3,
                "rounds": bench["stats"]["rounds"],
                "info": info,
            }
        )
    return data, groups


def _htc(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["provider"] == OURS), None)


def shape_of(rows: list[dict]) -> str:
    return next((r["info"]["shape"] for r in rows if "shape" in r["info"]), "")


def _is_stand_in(r: dict) -> bool:
    backend = r["info"].get("backend")
    return r["provider"] == OURS and backend not in (None, "cpu", "auto", "cuda", "triton")


def group_table(rows: list[dict]) -> tuple[list[str], list[list[str]], bool]:
    """One group's table (shared by the terminal and REPORT.md): headers, cells, whether the htc row
    is a stand-in backend."""
    htc = _htc(rows)
    rows = sorted(rows, key=lambda r: (r["provider"] != OURS, r[STAT]))
    table = []
    for r in rows:
        info = r["info"]
        floor = info.get("floor_ms")
        prov = r["provider"]
        if _is_stand_in(r):
            prov += f" [{info.get('backend')} stand-in]"
        table.append(
            [
                prov,
                _ms(r["median_ms"]),
                _ms(r["min_ms"]),
                f"{100 * r['iqr_ms'] / r['median_ms']:.0f}%" if r["median_ms"] else "-",
                str(r["rounds"]),
                f"{r[STAT] / htc[STAT]:.2f}x" if htc else "-",
                _ms(floor),
                f"{r[STAT] / floor:.1f}" if floor else "-",
                _mem(info.get("peak_extra_mem_bytes")),
                _mem(info.get("peak_rss_extra_bytes")) if "peak_rss_extra_bytes" in info else "",
                str(info.get("threads", "-")),
            ]
        )
    headers = ["provider", "median ms", "min ms", "IQR", "rounds", "peer/htc", "floor ms",
               "x floor", "peak extra mem", "peak RSS", "threads"]  # fmt: skip
    if not any(row[9] for row in table):
        headers.pop(9)
        table = [row[:9] + row[10:] for row in table]
    return headers, table, any(_is_stand_in(r) for r in rows)


def vllm_table(groups: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]] | None:
    """The vLLM serving rows (benchmarks/test_bench_vllm.py: ``extra_info["vllm"]``), one per
    group and provider; None when there are none."""
    rows = []
    for group, members in groups.items():
        for r in members:
            v = r["info"].get("vllm")
            if v:
                rows.append(
                    [
                        group,
                        r["provider"],
                        f"{v['requests_per_s']:.2f}",
                        str(v["prompt_tokens_per_request"]),
                        str(v["kv_blocks"]),
                        str(v["block_size"]),
                    ]
                )
    headers = ["group", "provider", "requests/s", "prompt tokens/request", "KV blocks", "block size"]
    return (headers, rows) if rows else None


def rates_line(mi: dict) -> str | None:
    rates = mi.get("htc_rates")
    if not rates:
        return None
    mkl, onednn = rates.get("sgemm_mkl_gflops"), rates.get("sgemm_onednn_gflops")
    both = f" (faster of torch.mm {mkl:.0f}, oneDNN {onednn:.0f})" if mkl and onednn else ""
    return (
        f"measured rates ({rates.get('threads')} threads): "
        f"sgemm {rates['sgemm_gflops']:.0f} GFLOP/s{both}, "
        f"bf16 GEMM {rates['bf16_gemm_gflops']:.0f} GFLOP/s, "
        f"copy {rates['copy_gbps']:.1f} GB/s (read+write)"
    )


def load_lines(mi: dict) -> list[str]:
    """The load average before the run, and the warning when the machine was busy."""
    start, cpus = mi.get("loadavg_at_start"), mi.get("cpu_count")
    if not (start and cpus):
        return []
    out = [f"load average before the run: {start[0]:.2f} (1 min) on {cpus} CPUs"]
    if start[0] > 0.5:
        out.append(
            "WARNING: other processes were using the CPU when the run started; multi-threaded "
            "timings and the thread-scaling ratio are unreliable (peers made of many small ops "
            "suffer most). Re-run on an idle machine, or compare with --stat min."
        )
    return out


def skipped_of(data: dict) -> list[dict]:
    """Skipped benchmarks recorded by benchmarks/conftest.py (nodeid, reason[, group, provider])."""
    return data.get("machine_info", {}).get("htc_skipped", [])


def render(data: dict, groups: dict[str, list[dict]]) -> str:
    out = []
    mi = data.get("machine_info", {})
    head = f"{data.get('datetime', '')}  {mi.get('cpu', {}).get('brand_raw', '')}".strip()
    out.append(f"Benchmark report: {head}")
    out += [line for line in [rates_line(mi)] if line]
    out += load_lines(mi)
    out.append(
        f"peer/htc: peer {STAT[:-3]} / htc {STAT[:-3]} (>1: htc is that many times faster). "
        f"x floor: {STAT[:-3]} / floor. IQR: of the rounds, relative to the median.\n"
        "Timings drift on shared machines; compare within a run."
    )
    stand_ins = set()
    for group, rows in groups.items():
        headers, table, stand_in = group_table(rows)
        if stand_in:
            stand_ins.add(group)
        out.append("")
        out.append(f"== {group}" + (f"  ({shape_of(rows)})" if shape_of(rows) else ""))
        out.append(_table(headers, table, right=set(range(1, len(headers)))))

    serving = vllm_table(groups)
    if serving:
        out.append("")
        out.append("== serving with vLLM (requests/s of the timed batch; KV blocks the batch occupies)")
        out.append(_table(*serving, right={2, 3, 4, 5}))

    checks = check_targets(groups)
    if checks:
        out.append("")
        out.append("== targets (attached to the htc rows)")
        out.append(_table(["group", "target", "measured", "verdict"], checks, right=set()))
    if stand_ins:
        out.append("")
        out.append(
            f"WARNING: in {len(stand_ins)} group(s) 'htc' is a stand-in backend, not our kernel: "
            "these numbers say nothing about htc."
        )
    skipped = skipped_of(data)
    if skipped:
        out.append("")
        out.append(f"== skipped ({len(skipped)})")
        out += [f"{e['nodeid']}: {e['reason']}" for e in skipped]
    return "\n".join(out)


def check_targets(groups: dict[str, list[dict]]) -> list[list[str]]:
    rows = []
    for group, members in groups.items():
        htc = _htc(members)
        if htc is None:
            continue
        for t in htc["info"].get("targets", []):
            if not isinstance(t, dict):  # not in the contract's form (benchmarks/README.md)
                rows.append([group, str(t), "not checkable", "?"])
                continue
            kind = t.get("kind")
            if kind == "speedup":
                want = f"{t['peer']} / htc >= {t['min']}x"
                if t.get("paired"):  # the peer need not have a row of its own
                    paired = htc["info"].get("paired", {}).get(t["peer"])
                    if paired is None:
                        rows.append([group, want, "paired ratio not measured", "?"])
                        continue
                    got, how = paired["ratio"], f" (interleaved, median of {paired['pairs']} pairs)"
                else:
                    peer = next((r for r in members if r["provider"] == t["peer"]), None)
                    if peer is None:
                        rows.append([group, want, "peer not run", "?"])
                        continue
                    got, how = peer[STAT] / htc[STAT], ""
                ok = got >= t["min"]
                verdict = "OK" if ok else f"MISS (by {t['min'] / got:.2f}x)"
                rows.append([group, want, f"{got:.2f}x{how}", verdict])
            elif kind == "floor":
                floor = htc["info"].get("floor_ms")
                want = f"htc / floor <= {t['max']}"
                if not floor:
                    rows.append([group, want, "no floor", "?"])
                    continue
                got = htc[STAT] / floor
                verdict = "OK" if got <= t["max"] else f"MISS (by {got / t['max']:.2f}x)"
                rows.append([group, want, f"{got:.2f}", verdict])
            elif kind == "mem_growth":
                other = _htc(groups.get(t["vs_group"], []))
                want = f"htc peak mem / [{t['vs_group']}] <= {t['max']}"
                if t.get("note"):
                    want += f" ({t['note']})"
                mine = htc["info"].get("peak_extra_mem_bytes")
                theirs = other["info"].get("peak_extra_mem_bytes") if other else None
                if not mine or not theirs:
                    rows.append([group, want, "not measured", "?"])
                    continue
                got = mine / theirs
                verdict = "OK" if got <= t["max"] else f"MISS (by {got / t['max']:.2f}x)"
                rows.append([group, want, f"{got:.2f}x ({_mem(theirs)} -> {_mem(mine)})", verdict])
            else:
                rows.append([group, json.dumps(t), "unknown target kind", "?"])
    return rows


# --------------------------------------------------------------------------------------------------
# REPORT.md
# --------------------------------------------------------------------------------------------------


def family_of(group: str) -> str:
    return group.split(":", 1)[0].strip()


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _providers(rows: list[dict], skipped: list[dict] = ()) -> list[str]:
    """htc first, then the others in the order they ran (skipped ones included)."""
    names = [r["provider"] for r in rows] + [e["provider"] for e in skipped if "provider" in e]
    return sorted(dict.fromkeys(names), key=lambda p: p != OURS)


def _skip_for(skipped: list[dict], group: str, provider: str) -> dict | None:
    return next((e for e in skipped if e.get("group") == group and e.get("provider") == provider), None)


def family_tables(groups: dict[str, list[dict]], skipped: list[dict]) -> list[str]:
    """One table per family: a row per case (group), a column per provider with its time and
    peer/htc, then the floor and htc's time / floor; below it, the full per-group tables."""
    families: dict[str, list[str]] = {}
    for group in groups:
        families.setdefault(family_of(group), []).append(group)
    out = []
    for fam, names in families.items():
        fam_skips = [e for e in skipped if e.get("group") in names]
        provs = _providers([r for g in names for r in groups[g]], fam_skips)
        headers = ["case", "shape", *[f"{p} ({STAT[:-3]} ms)" for p in provs], "floor ms", "htc x floor"]
        table = []
        for g in names:
            rows, htc = groups[g], _htc(groups[g])
            cells = []
            for p in provs:
                r = next((r for r in rows if r["provider"] == p), None)
                if r is None:
                    cells.append("skipped" if _skip_for(skipped, g, p) else "-")
                elif htc is None or r is htc:
                    cells.append(_ms(r[STAT]))
                else:
                    cells.append(f"{_ms(r[STAT])} ({r[STAT] / htc[STAT]:.2f}x)")
            floor = next((r["info"]["floor_ms"] for r in rows if r["info"].get("floor_ms")), None)
            xfloor = f"{htc[STAT] / floor:.1f}" if htc and floor else "-"
            table.append([g.split(":", 1)[-1].strip(), shape_of(rows), *cells, _ms(floor), xfloor])
        out += [f"### {fam}", "", md_table(headers, table), ""]
        out += ["<details><summary>every row (min, IQR, rounds, peak memory, threads)</summary>", ""]
        for g in names:
            headers_g, table_g, _ = group_table(groups[g])
            out += [f"**{g}**" + (f" ({shape_of(groups[g])})" if shape_of(groups[g]) else ""), ""]
            out += [md_table(headers_g, table_g), ""]
        out += ["</details>", ""]
    return out


# end_to_end rows (contract: benchmarks/README.md): group "end_to_end: <metric> b<B>".


def _e2e(r: dict) -> dict:
    return r["info"].get("e2e") or {}


E2E_GROUP = re.compile(r"^end_to_end:\s*(?P<metric>.+?)\s+b(?P<batch>\d+)\s*$")
# (column title, metric of the group the value comes from, how to read it, is it bytes)
E2E_COLUMNS = [
    ("TTFT ms", "ttft", lambda r: r[STAT], False),
    ("decode@64 ms/token", "decode@64", lambda r: _e2e(r).get("ms_per_token"), False),
    ("decode@512 ms/token", "decode@512", lambda r: _e2e(r).get("ms_per_token"), False),
    # from the decode rows: they exist for every batch (b8 TTFT runs with HTC_BENCH_FULL=1 only)
    ("KV after prefill", "decode@64", lambda r: _e2e(r).get("kv_bytes_after_prefill"), True),
    ("peak extra mem", "ttft", lambda r: r["info"].get("peak_extra_mem_bytes"), True),
    ("ask-many ms/question", "ask-many x10", lambda r: _e2e(r).get("ms_per_question"), False),
]
BREAKDOWN = [
    ("vision_encoder_ms", "vision encoder (ms)"),
    ("mgvq_encoder_ms", "MGVQ encoder (ms)"),
    ("projection_fusion_ms", "projection + fusion (ms)"),
    ("prefill_ms", "prefill (ms)"),
    ("decode_ms_per_token", "decode (ms/token)"),
    ("time_to_first_token_ms", "time to first token (ms)"),
]


def e2e_rows(groups: dict[str, list[dict]]) -> dict[tuple[str, int], list[dict]]:
    """(metric, batch) -> rows of the end_to_end groups."""
    out = {}
    for g, rows in groups.items():
        m = E2E_GROUP.match(g)
        if m:
            out[(m["metric"], int(m["batch"]))] = rows
    return out


def _e2e_skips(skipped: list[dict]) -> dict[tuple[str, int, str], str]:
    out = {}
    for e in skipped:
        m = E2E_GROUP.match(e.get("group", ""))
        if m and "provider" in e:
            out[(m["metric"], int(m["batch"]), e["provider"])] = e["reason"]
    return out


def e2e_section(groups: dict[str, list[dict]], skipped: list[dict]) -> list[str]:
    by = e2e_rows(groups)
    skips = _e2e_skips(skipped)
    if not by and not skips:
        return ["No end_to_end rows in this run (benchmarks/test_bench_end_to_end.py).", ""]
    all_rows = [r for rows in by.values() for r in rows]
    provs = sorted(
        dict.fromkeys([r["provider"] for r in all_rows] + [p for (_m, _b, p) in skips]),
        key=lambda p: p != OURS,
    )
    batches = sorted({b for (_m, b) in by} | {b for (_m, b, _p) in skips})
    # A column per (quantity, batch) that was measured or skipped: no column of nothing but "-".
    cols = [
        (f"{title} b{b}", metric, b, read, is_bytes)
        for title, metric, read, is_bytes in E2E_COLUMNS
        for b in batches
        if (metric, b) in by or any(k[:2] == (metric, b) for k in skips)
    ]

    def value(metric, b, p, read):
        r = next((r for r in by.get((metric, b), []) if r["provider"] == p), None)
        return None if r is None else read(r)

    table, ratios = [], []
    for p in provs:
        cells, rcells = [p], [p]
        for _title, metric, b, read, is_bytes in cols:
            v, ref = value(metric, b, p, read), value(metric, b, OURS, read)
            if v is None:
                reason = skips.get((metric, b, p))
                cells.append(f"skipped: {reason}" if reason else "-")
                rcells.append("-")
                continue
            cells.append(_mem(v) if is_bytes else _ms(v))
            rcells.append(f"{v / ref:.2f}x" if ref else "-")
        table.append(cells)
        ratios.append(rcells)
    headers = ["provider", *[c[0] for c in cols]]
    out = [md_table(headers, table), ""]
    out += [
        f"TTFT is the {STAT[:-3]} time of a round; decode ms/token and ask-many ms/question are the "
        "benchmark's own figures (the rows' e2e fields). Ratios: provider / htc (> 1: htc is faster "
        "or leaner).",
        "",
    ]
    out += [md_table(headers, [r for r in ratios if r[0] != OURS]), ""]
    labels = {r["provider"]: r["info"]["label"] for r in all_rows if r["info"].get("label")}
    out += [f"- **{p}**: {labels[p]}" for p in provs if p in labels]
    out.append("")
    # Paper Table 11: the time of each stage, one table per batch size measured.
    for (metric, b), rows in sorted(by.items()):
        if metric != "table11":
            continue
        bd = {r["provider"]: _e2e(r).get("breakdown", {}) for r in rows}
        names = dict(BREAKDOWN)
        keys = list(names) + sorted({k for d in bd.values() for k in d} - names.keys())
        tprovs = [p for p in provs if p in bd]
        out += [f"Table 11 breakdown, batch {b}:", ""]
        out += [
            md_table(
                ["stage", *tprovs],
                [[names.get(k, k), *[_ms(bd[p].get(k)) for p in tprovs]] for k in keys],
            ),
            "",
        ]
    scale = next((_e2e(r)["scale"] for r in all_rows if _e2e(r).get("scale")), None)
    if scale:
        out += [f"Scale: {scale}", ""]
    return out


def gpu_section(results: Path) -> list[str]:
    files = sorted(results.glob("gpu-*.md"))
    if not files:
        return [
            "No GPU run is recorded (no `gpu-*.md` in the results directory). On a machine with a GPU, "
            "`scripts/gpu_check.sh` writes them to `benchmarks/results/`.",
            "",
        ]
    out = []
    for f in files:
        out += [f"### {f.name}", ""]
        for line in f.read_text().splitlines():
            # Nest the file's own headings under this one.
            out.append("##" + line if line.startswith("#") else line)
        out.append("")
    return out


def _commit(data: dict) -> str:
    """The commit the run measured (pytest-benchmark's commit_info), else the checkout's HEAD."""
    ci = data.get("commit_info") or {}
    if ci.get("id"):
        return ci["id"][:7] + (" (dirty)" if ci.get("dirty") else "")
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() + " (HEAD when the report was written)" if res.returncode == 0 else "unknown"


def render_markdown(
    data: dict, groups: dict[str, list[dict]], *, json_path: Path, out: Path, results: Path, plots: list
) -> str:
    """REPORT.md. ``plots``: (title, path or None, note) from write_plots."""
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    skipped = skipped_of(data)
    env = " ".join(f"{k}={v}" for k, v in mi.get("htc_env", {}).items())
    rel = os.path.relpath

    def shown(p: Path) -> str:  # a path in the command: relative to the checkout when inside it
        p = p.resolve()
        return str(p.relative_to(HERE.parent)) if p.is_relative_to(HERE.parent) else str(p)

    md = ["# htc-kernels benchmark report", ""]
    md.append(
        f"Generated by `python -m benchmarks.report` from `{shown(json_path)}`. "
        "Absolute times drift on shared machines; ratios within one run hold."
    )
    md += ["", "## Machine", ""]
    md.append(f"- CPU: {cpu.get('brand_raw', 'unknown')}, {mi.get('cpu_count', '?')} logical CPUs")
    md.append(f"- torch {mi.get('torch', '?')}, Python {mi.get('python_version', '?')}")
    md.append(f"- date: {data.get('datetime', '?')}; commit: {_commit(data)}")
    md += [f"- {line}" for line in [rates_line(mi)] if line]
    md += [f"- {line}" for line in load_lines(mi)]
    stand_ins = [g for g, rows in groups.items() if any(_is_stand_in(r) for r in rows)]
    if stand_ins:
        md.append(f"- WARNING: in {len(stand_ins)} group(s) 'htc' is a stand-in backend, not our kernel.")
    md += ["", "Reproduce:", "", "```bash"]
    md.append(
        f"{env + ' ' if env else ''}python -m pytest benchmarks/ --benchmark-only -p no:randomly "
        f"--benchmark-json={shown(json_path)}"
    )
    md.append(f"python -m benchmarks.report {shown(json_path)} --stat {STAT[:-3]}")
    md += ["```", "", "(or `make bench`, which runs both.)", ""]
    md.append(
        f"Ratios are peer / htc of the {STAT[:-3]} time (> 1: htc is that many times faster); "
        "x floor is htc's time over the roofline floor at this machine's measured rates."
    )

    md += ["", "## Targets", ""]
    checks = check_targets(groups)
    md += [md_table(["group", "target", "measured", "verdict"], checks) if checks else "No targets.", ""]

    md += ["## End to end", ""]
    md += e2e_section(groups, skipped)

    serving = vllm_table(groups)
    if serving:
        md += ["## Serving with vLLM", ""]
        md += [
            "benchmarks/test_bench_vllm.py: the same requests served by an unmodified vLLM, each image "
            "either HTC-compressed (its kept KV loaded by htc_model.serving's connector) or as its 580 "
            "visual tokens of plain prompt (plain-580). requests/s of the timed batch; KV blocks the "
            "batch occupies (from prompt and output lengths).",
            "",
            md_table(*serving),
            "",
        ]

    md += ["## Plots", ""]
    for title, path, note in plots:
        if path is not None:
            md += [f"![{title}]({rel(path, out.parent)})", ""]
        if note:
            md += [f"{title}: {note}", ""]

    md += ["## Tables by family", ""]
    md += family_tables(groups, skipped)

    md += ["## GPU", ""]
    md += gpu_section(results)

    md += ["## Skipped", ""]
    if skipped:
        md += [md_table(["benchmark", "reason"], [[e["nodeid"], e["reason"]] for e in skipped]), ""]
    elif "htc_skipped" in mi:
        md += ["Nothing was skipped.", ""]
    else:
        md += ["This JSON does not record skipped benchmarks (made before benchmarks/conftest.py did).", ""]
    return "\n".join(md)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

MEM_GROUP = re.compile(r"^star_attention: mem S=(?P<s>\d+) (?P<dtype>\w+) (?P<mode>\w+)$")


def _machine_title(data: dict) -> str:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}).get("brand_raw", "?")
    return f"{cpu}, {mi.get('cpu_count', '?')} CPUs, torch {mi.get('torch', '?')}"


def plot_series(groups: dict[str, list[dict]]) -> dict[str, dict]:
    """The data of each plot: {(provider, variant): [(x, y), ...]} per line plot (empty: no data),
    {provider: ms} for the thread-scaling bars."""
    sweep = {"seq_len": {}, "images": {}}
    for rows in groups.values():
        for r in rows:
            sw = r["info"].get("sweep")
            if sw and sw.get("axis") in sweep:
                sweep[sw["axis"]].setdefault((r["provider"], ""), []).append((sw["value"], r[STAT]))
    decode, kv = {}, {}
    for (metric, b), rows in e2e_rows(groups).items():
        for r in rows:
            e2e = _e2e(r)
            if metric.startswith("decode@") and e2e.get("ms_per_token") is not None:
                decode.setdefault((r["provider"], f"b{b}"), []).append(
                    (e2e["generated"], e2e["ms_per_token"])
                )
            if e2e.get("kv_bytes_by_generated"):
                kv[(r["provider"], f"b{b}")] = [(int(n), v) for n, v in e2e["kv_bytes_by_generated"].items()]
    threads = {}
    for g, rows in groups.items():
        if g.startswith("star_attention: threads"):
            threads = {r["provider"]: r[STAT] for r in rows}
    mem = {}
    for g, rows in groups.items():
        m = MEM_GROUP.match(g)
        if m:
            for r in rows:
                if r["info"].get("peak_extra_mem_bytes"):
                    mem.setdefault((r["provider"], m["mode"]), []).append(
                        (int(m["s"]), r["info"]["peak_extra_mem_bytes"] / 2**20)
                    )
    return {"seq_len": sweep["seq_len"], "images": sweep["images"], "decode": decode, "kv": kv,
            "threads": threads, "mem": mem}  # fmt: skip


def _lines(ax, data_lines: dict, xlabel: str, ylabel: str, logx: bool = True, logy: bool = True) -> None:
    """One line per (provider, variant) key: a colour per provider (the same in every plot), a line
    style per variant (fwd / fwdbwd, b1 / b8)."""
    styles = ["-", "--", ":", "-."]
    variants = sorted({v for _p, v in data_lines})
    for prov, variant in sorted(data_lines, key=lambda k: (k[0] != OURS, k)):
        pts = sorted(data_lines[(prov, variant)])
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            color=_color(prov),
            linestyle=styles[variants.index(variant) % len(styles)],
            label=f"{prov} {variant}".strip(),
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
        # Ticks at the measured points, in plain numbers (log axes print 10^3 otherwise).
        xs = sorted({p[0] for pts in data_lines.values() for p in pts})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


_COLORS = {}


def _color(provider: str) -> str:
    return _COLORS.setdefault(provider, f"C{len(_COLORS) % 10}")


def _plot_seq_len(fig, series):
    _lines(fig.add_subplot(), series["seq_len"], "sequence length S (one image, 8 heads)", f"{STAT[:-3]} ms")


def _plot_images(fig, series):
    ax = fig.add_subplot()
    _lines(ax, series["images"], "images (580 visual + 1 voco + 8 text each, 8 heads)", f"{STAT[:-3]} ms")
    ax.set_xscale("log", base=2)


def _plot_e2e(fig, series):
    fig.set_size_inches(11, 4.5)
    _lines(fig.add_subplot(1, 2, 1), series["decode"], "generated tokens", "decode ms / token", logy=False)
    mib = {k: [(x, y / 2**20) for x, y in v] for k, v in series["kv"].items()}
    _lines(fig.add_subplot(1, 2, 2), mib, "generated tokens", "KV cache MiB", logx=False, logy=False)


def _plot_threads(fig, series):
    ax = fig.add_subplot()
    names = list(series["threads"])
    times = [series["threads"][n] for n in names]
    ax.bar(names, times, color=[_color(n) for n in names])
    ax.set_ylabel(f"{STAT[:-3]} ms (LLaVA shape, fp32 forward)")
    one = series["threads"].get("htc 1 thread")
    if one:  # speed-up over one thread on each bar
        for i, t in enumerate(times):
            ax.annotate(f"{one / t:.2f}x vs 1 thread", (i, t), ha="center", va="bottom")


def _plot_mem(fig, series):
    _lines(fig.add_subplot(), series["mem"], "sequence length S (8 heads)", "peak extra memory MiB")


PLOTS = [  # file name, title, series it needs, drawer, what makes its data
    ("star_attention_vs_seq_len.png", "star_attention fp32 forward vs sequence length", ("seq_len",),
     _plot_seq_len, "the star_attention sweeps"),
    ("star_attention_vs_images.png", "star_attention fp32 forward vs number of images", ("images",),
     _plot_images, "the star_attention sweeps"),
    ("end_to_end_decode_kv.png", "end to end: decode latency and KV cache vs generated tokens",
     ("decode", "kv"), _plot_e2e, "benchmarks/test_bench_end_to_end.py"),
    ("star_attention_threads.png", "star_attention thread scaling", ("threads",), _plot_threads,
     "test_star_attention_threads (needs >= 2 threads)"),
    ("star_attention_memory.png", "star_attention peak extra memory vs S", ("mem",), _plot_mem,
     "test_star_attention_memory"),
]  # fmt: skip


def write_plots(data: dict, groups: dict[str, list[dict]], outdir: Path) -> list[tuple]:
    """Write the PNGs; return (title, path or None, note) for each. Never raises: without matplotlib,
    without data or when a plot fails, the note says why there is no picture."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        note = f"not drawn: matplotlib is not importable ({exc}); pip install -r requirements/dev.txt"
        return [(title, None, note) for _f, title, _k, _d, _how in PLOTS]
    series = plot_series(groups)
    machine = _machine_title(data)
    outdir.mkdir(parents=True, exist_ok=True)
    done = []
    for name, title, keys, drawer, how in PLOTS:
        if not any(series[k] for k in keys):
            done.append((title, None, f"no data in this run (made by {how})"))
            continue
        fig = plt.figure(figsize=(7, 4.5))
        try:
            drawer(fig, series)
            fig.suptitle(f"{title}\n{machine}", fontsize=9)
            fig.tight_layout()
            fig.savefig(outdir / name, dpi=110)
            done.append((title, outdir / name, ""))
        except Exception as exc:  # noqa: BLE001 (a broken plot must not cost the report)
            print(f"benchmarks.report: plot {name} failed: {exc!r}", file=sys.stderr)
            done.append((title, None, f"not drawn: {type(exc).__name__}: {exc}"))
        finally:
            plt.close(fig)
    return done


def main(argv: list[str] | None = None) -> int:
    global STAT
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("json", nargs="?", default=str(DEFAULT), help="pytest-benchmark JSON file")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="statistic for ratios and targets (default: median)")  # fmt: skip
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report (default: %(default)s)")
    parser.add_argument("--results", default=str(DEFAULT.parent),
                        help="where gpu-*.md are read and plots/ written (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    STAT = f"{args.stat}_ms"
    path = Path(args.json)
    if not path.exists():
        print(
            f"benchmarks.report: {path} does not exist; run `make bench` (or pytest benchmarks/ "
            f"--benchmark-only --benchmark-json={path}) first",
            file=sys.stderr,
        )
        return 2
    data, groups = load(path)
    if not groups:
        print(f"benchmarks.report: no benchmarks in {path}", file=sys.stderr)
        return 2
    print(render(data, groups))
    out, results = Path(args.out), Path(args.results)
    plots = write_plots(data, groups, results / "plots")
    out.parent.mkdir(parents=True, exist_ok=True)
    md = render_markdown(data, groups, json_path=path, out=out, results=results, plots=plots)
    out.write_text(md + "\n")
    drawn = sum(p is not None for _t, p, _n in plots)
    print(f"\nwrote {out} and {drawn} plot(s) in {results / 'plots'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
