"""benchmarks/report.py on a small synthetic pytest-benchmark JSON: the terminal tables, REPORT.md
(machine, targets, the end-to-end table, family tables, GPU section, skipped reasons) and the plots."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from benchmarks import report

MS = 1e-3


def _row(group, provider, ms, **info):
    return {
        "name": f"test[{group}-{provider}]",
        "group": group,
        "stats": {"median": ms * MS, "min": 0.9 * ms * MS, "iqr": 0.0, "rounds": 5},
        "extra_info": {"provider": provider, "threads": 2, **info},
    }


def _e2e_rows():
    """end_to_end rows following benchmarks/README.md's contract (htc, vanilla; voco-style's ttft b1
    is a recorded skip)."""
    rows = []
    scale = "LLaMA-7B width, 1 of 32 decoder layers; random weights; fp32 on CPU"
    kv = {"htc": 10 * 2**20, "vanilla": 40 * 2**20, "voco-style": 41 * 2**20}
    for prov, f in (("htc", 1.0), ("vanilla", 3.0), ("voco-style", 4.0)):
        common = {"label": f"{prov} long name"}
        base = {"batch": 1, "kv_bytes_after_prefill": kv[prov], "scale": scale}
        by_gen = {"0": kv[prov], "64": kv[prov] + 2**20, "512": kv[prov] + 8 * 2**20}
        for b in (1, 8):
            if not (prov == "voco-style" and b == 1):
                rows.append(
                    _row(f"end_to_end: ttft b{b}", prov, 100 * f * b, label=common["label"],
                         peak_extra_mem_bytes=int(f * 2**30),
                         e2e={**base, "metric": "ttft", "batch": b})
                )  # fmt: skip
            for gen in (64, 512):
                rows.append(
                    _row(f"end_to_end: decode@{gen} b{b}", prov, gen * 5 * f, label=common["label"],
                         e2e={**base, "metric": f"decode@{gen}", "batch": b, "generated": gen,
                              "ms_per_token": 5 * f * b + gen / 512, "kv_bytes_by_generated": by_gen})
                )  # fmt: skip
        rows.append(
            _row("end_to_end: ask-many x10 b1", prov, 700 * f, label=common["label"],
                 e2e={**base, "metric": "ask-many x10", "ms_per_question": 70 * f})
        )  # fmt: skip
        breakdown = {"vision_encoder_ms": 250.0, "mgvq_encoder_ms": 30.0 if prov == "htc" else 0.0,
                     "projection_fusion_ms": 4.0, "prefill_ms": 60 * f, "decode_ms_per_token": 5 * f,
                     "time_to_first_token_ms": 344 * f}  # fmt: skip
        rows.append(
            _row("end_to_end: table11 b1", prov, 344 * f, label=common["label"],
                 e2e={**base, "metric": "table11", "breakdown": breakdown})
        )  # fmt: skip
    return rows


def synthetic(load=2.5) -> dict:
    llava = "star_attention: llava fp32 fwd"
    targets = [
        {"kind": "speedup", "peer": "sdpa dense mask", "min": 10.0},  # 12x: OK
        {"kind": "speedup", "peer": "hand-split", "min": 2.5},  # 2x: MISS by 1.25x
        {"kind": "floor", "max": 3.0},  # 2/1: OK
    ]
    rows = [
        _row(llava, "htc", 2.0, floor_ms=1.0, shape="B=1 H=32 S=680 D=128", targets=targets),
        _row(llava, "sdpa dense mask", 24.0, floor_ms=1.0, shape="B=1 H=32 S=680 D=128"),
        _row(llava, "hand-split", 4.0, floor_ms=1.0, shape="B=1 H=32 S=680 D=128"),
        _row("star_attention: threads llava fp32 fwd (2 vs 1)", "htc", 2.0),
        _row("star_attention: threads llava fp32 fwd (2 vs 1)", "htc 1 thread", 3.6),
        # rows timed apart read 0.50x; the htc row's own interleaved pairs read 0.97x (OK)
        _row(
            "hf decode: tiny",
            "htc",
            2.0,
            paired={"text-only": {"ratio": 0.97, "pairs": 30}},
            targets=[{"kind": "speedup", "peer": "text-only", "min": 0.952, "paired": True}],
        ),
        _row("hf decode: tiny", "text-only", 1.0),
        # a paired target whose peer has no row of its own (our fp32 kernel, timed in alternation)
        _row(
            "star_attention: llava bf16 fwd",
            "htc",
            3.0,
            paired={"htc fp32": {"ratio": 0.95, "pairs": 30}},
            targets=[{"kind": "speedup", "peer": "htc fp32", "min": 1.667, "paired": True}],
        ),
        _row(
            "vllm: 8 requests",
            "htc",
            1000.0,
            vllm={"requests_per_s": 57.3, "prompt_tokens_per_request": 7, "kv_blocks": 8, "block_size": 32},
        ),
        _row(
            "vllm: 8 requests",
            "plain-580",
            1100.0,
            vllm={
                "requests_per_s": 69.4,
                "prompt_tokens_per_request": 587,
                "kv_blocks": 152,
                "block_size": 32,
            },
        ),
        _row("mgvq_lookup: 16 images", "htc", 30.0),
        _row("mgvq_lookup: 16 images", "bmm argmax", 240.0),
    ]
    for s, f in ((341, 0.5), (680, 1), (1359, 2)):
        for prov, t in (("htc", 0.3), ("sdpa dense mask", 3.0), ("eager", 9.0)):
            rows.append(
                _row(
                    f"star_attention: sweep S={s} fp32 fwd",
                    prov,
                    t * f * f,
                    sweep={"axis": "seq_len", "value": s},
                )
            )
    for n in (1, 2, 4):
        for prov, t in (("htc", 0.3), ("hand-split", 1.0)):
            rows.append(
                _row(
                    f"star_attention: sweep images={n} fp32 fwd",
                    prov,
                    t * n,
                    sweep={"axis": "images", "value": n},
                )
            )
    for s, mem in ((680, 2**20), (2720, 4 * 2**20)):
        for prov, f in (("htc", 1), ("sdpa dense mask", 16)):
            rows.append(_row(f"star_attention: mem S={s} fp32 fwd", prov, 1.0, peak_extra_mem_bytes=mem * f))
    rows += _e2e_rows()
    skipped = [
        {"nodeid": "benchmarks/test_bench_x.py", "reason": "could not import 'xformers': no module"},
        {"nodeid": "benchmarks/test_bench_end_to_end.py::test_e2e[ttft-b1-voco-style]",
         "reason": "voco reason: peer not installed", "group": "end_to_end: ttft b1",
         "provider": "voco-style"},
    ]  # fmt: skip
    return {
        "machine_info": {
            "cpu": {"brand_raw": "Test CPU 9000"},
            "cpu_count": 2,
            "torch": "2.99.0",
            "python_version": "3.11.0",
            "loadavg_at_start": [load, 1.0, 1.0],
            "htc_rates": {"threads": 2, "sgemm_gflops": 100.0, "bf16_gemm_gflops": 200.0, "copy_gbps": 10.0},
            "htc_env": {"OMP_NUM_THREADS": "2"},
            "htc_skipped": skipped,
        },
        "commit_info": {"id": "abcdef1234567", "dirty": False},
        "datetime": "2026-01-02T03:04:05",
        "benchmarks": rows,
    }


def _run(tmp_path, data, gpu=True, argv=()):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    results = tmp_path / "results"
    results.mkdir()
    if gpu:
        (results / "gpu-fake.md").write_text(
            "# star_attention on FakeGPU\n\n| provider | ms |\n|---|---|\n| htc | 0.5 |\n"
        )
    out = tmp_path / "REPORT.md"
    rc = report.main([str(path), "--out", str(out), "--results", str(results), *argv])
    assert rc == 0
    return out.read_text(), results


def _table_row(md: str, first_cell: str, after: str = "", contains: str = "") -> list[str]:
    """The cells of the first markdown table row after ``after`` whose first cell is ``first_cell``
    (and that contains ``contains``)."""
    for line in md[md.index(after) :].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell and contains in line:
            return cells
    raise AssertionError(f"no row {first_cell!r} after {after!r}")


def test_report_markdown(tmp_path, capsys):
    md, _results = _run(tmp_path, synthetic())
    term = capsys.readouterr().out
    # The terminal tables are still printed.
    assert "== star_attention: llava fp32 fwd" in term and "== targets" in term
    assert "voco reason: peer not installed" in term

    # Machine, rates, load warning, reproduce command.
    assert "Test CPU 9000, 2 logical CPUs" in md and "torch 2.99.0" in md and "abcdef1" in md
    assert "sgemm 100 GFLOP/s" in md and "copy 10.0 GB/s" in md
    assert "WARNING: other processes were using the CPU" in md
    assert "OMP_NUM_THREADS=2 python -m pytest benchmarks/ --benchmark-only" in md

    # Targets with their verdicts.
    assert _table_row(md, "star_attention: llava fp32 fwd", "## Targets")[1:] == [
        "sdpa dense mask / htc >= 10.0x", "12.00x", "OK"
    ]  # fmt: skip
    miss = _table_row(md, "star_attention: llava fp32 fwd", "## Targets", contains="hand-split / htc")
    assert miss[2:] == ["2.00x", "MISS (by 1.25x)"]
    assert _table_row(md, "vllm: 8 requests", "## Serving with vLLM", contains="plain-580")[2:] == [
        "69.40", "587", "152", "32"
    ]  # fmt: skip
    assert _table_row(md, "hf decode: tiny", "## Targets")[2:] == [
        "0.97x (interleaved, median of 30 pairs)", "OK"
    ]  # fmt: skip
    assert _table_row(md, "star_attention: llava bf16 fwd", "## Targets")[2:] == [
        "0.95x (interleaved, median of 30 pairs)", "MISS (by 1.75x)"
    ]  # fmt: skip

    # One table per family, providers as columns, ratio peer/htc, floor and x floor.
    fam = md[md.index("### star_attention") :]
    assert _table_row(fam, "llava fp32 fwd")[2:] == [
        "2.000",
        "24.0 (12.00x)",
        "4.000 (2.00x)",
        "-",
        "-",
        "1.000",
        "2.0",
    ]
    assert "### mgvq_lookup" in md and "240.0 (8.00x)" in _table_row(md, "16 images", "### mgvq_lookup")
    assert "### end_to_end" in md

    # End to end: values, a recorded skip's reason, ratios, Table 11, scale.
    e2e = md[md.index("## End to end") : md.index("## Plots")]
    header = _table_row(e2e, "provider")
    assert header[:3] == ["provider", "TTFT ms b1", "TTFT ms b8"]
    assert "decode@512 ms/token b8" in header and "ask-many ms/question b1" in header
    assert "ask-many ms/question b8" not in header  # never measured: no column of "-"
    htc = dict(zip(header, _table_row(e2e, "htc")))
    assert htc["TTFT ms b1"] == "100.0" and htc["decode@64 ms/token b1"] == "5.125"
    assert htc["KV after prefill b1"] == "10.0 MiB" and htc["peak extra mem b1"] == "1.0 GiB"
    assert htc["ask-many ms/question b1"] == "70.0"
    voco = dict(zip(header, _table_row(e2e, "voco-style")))
    assert voco["TTFT ms b1"] == "skipped: voco reason: peer not installed"
    ratios = dict(zip(header, _table_row(e2e, "vanilla", "Ratios")))
    assert ratios["TTFT ms b1"] == "3.00x" and ratios["KV after prefill b1"] == "4.00x"
    assert _table_row(e2e, "MGVQ encoder (ms)", "Table 11")[1:] == ["30.0", "0.000", "0.000"]
    assert "Scale: LLaMA-7B width, 1 of 32 decoder layers" in e2e
    assert "**vanilla**: vanilla long name" in e2e

    # GPU section: the file's content, nested under its own heading.
    gpu = md[md.index("## GPU") : md.index("## Skipped")]
    assert "### gpu-fake.md" in gpu and "### star_attention on FakeGPU" in gpu and "| htc | 0.5 |" in gpu

    # Every skipped benchmark with its reason.
    skipped = md[md.index("## Skipped") :]
    assert "benchmarks/test_bench_x.py" in skipped and "could not import 'xformers'" in skipped
    assert "test_e2e[ttft-b1-voco-style]" in skipped


def test_report_without_gpu_runs_and_quiet_machine(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plots needed here (faster)
    md, _results = _run(tmp_path, synthetic(load=0.1), gpu=False, argv=["--stat", "min"])
    assert "No GPU run is recorded" in md and "scripts/gpu_check.sh" in md
    assert "WARNING: other processes" not in md
    assert "--stat min" in md


def test_report_plots(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (requirements/dev.txt): plots are not written")
    md, results = _run(tmp_path, synthetic())
    names = [name for name, *_ in report.PLOTS]
    for name in names:
        png = results / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"](results/plots/{name})" in md  # relative to REPORT.md


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    md, results = _run(tmp_path, synthetic())
    assert "not drawn: matplotlib is not importable" in md
    assert not (results / "plots").exists()
    assert "## Tables by family" in md


def test_report_says_what_is_missing(tmp_path):
    data = synthetic()
    data["benchmarks"] = [b for b in data["benchmarks"] if not b["group"].startswith("end_to_end")]
    data["machine_info"]["htc_skipped"] = []
    md, _results = _run(tmp_path, data)
    assert "No end_to_end rows in this run" in md
    assert "Nothing was skipped." in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert "no data in this run (made by benchmarks/test_bench_end_to_end.py)" in md
