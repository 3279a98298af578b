"""scripts/gpu_check.sh and its benchmark (benchmarks/gpu_star_attention.py) must not rot between the
rare runs on a GPU: the benchmark's --smoke mode runs its whole pipeline here (tiny shapes; providers
that need CUDA are skipped with the reason), the target arithmetic is checked on made-up numbers, and
the script passes bash's syntax check (and shellcheck where it is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the root on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_star_attention as g  # noqa: E402
from benchmarks import ncu_stalls  # noqa: E402


def test_benchmark_smoke_writes_tables_and_json(tmp_path):
    assert g.main(["--smoke", "--quick", "--out", str(tmp_path)]) == 0  # no WRONG or ERROR row
    stem = "smoke-cuda" if torch.cuda.is_available() else "smoke-cpu"
    md = (tmp_path / f"{stem}.md").read_text()
    data = json.loads((tmp_path / f"{stem}.json").read_text())

    assert data["smoke"] is True
    env = data["environment"]
    for key in ("python", "torch", "torch_cuda", "device", "packages", "missing", "htc_kernels"):
        assert key in env
    assert data["rates"]["copy_bytes_per_s"] > 0 and data["rates"]["bf16_gemm_flop_per_s"] > 0
    assert [(u["case"], u["mode"]) for u in data["units"]] == list(g.QUICK_UNITS)
    providers = [*g.PROVIDERS, g.STAND_IN]
    for u in data["units"]:
        f = u["floors"]
        assert f["bytes"] > 0 and f["flops"] > 0 and f["floor_us"] >= f["hbm_measured_us"] > 0
        assert 0 < u["allowed_frac_of_causal"] <= 1
        rows = {r["provider"]: r for r in u["rows"]}
        assert list(rows) == providers
        for name, r in rows.items():
            assert r["status"] in ("ok", "SKIP"), (u["case"], u["mode"], name, r)
            if r["status"] == "SKIP":
                assert r["reason"].strip(), f"{name} skipped without a reason"
            else:
                assert r["median_ms"] > 0 and r["reps"] >= 2
                assert all(r["rel_err"][k] <= r["tolerance"][k] for k in r["rel_err"])
                assert len(r["rel_err"]) == (4 if u["mode"] == "fwdbwd" else 1)
        for name in ("sdpa dense mask", "sdpa causal (flash)", g.STAND_IN):
            assert rows[name]["status"] == "ok", (name, rows[name])
        if not torch.cuda.is_available():
            assert "cuda" in rows["htc cuda"]["reason"]
            assert "CUDA" in rows["xformers bias"]["reason"] or "xformers" in rows["xformers bias"]["reason"]
        if u["mode"] == "fwd":  # eager flex checks the mask_mod and block mask of the GPU runs
            assert rows["flex compiled"]["status"] == "ok"
            assert u["notes"]["flex_block_mask_ms"]["first"] > 0

    stand_in = [t for t in data["targets"] if t["htc"] == g.STAND_IN]
    assert len(stand_in) == len(g.TARGETS)
    assert all(t["verdict"] in ("PASS", "FAIL", "N/A") and t["detail"] for t in data["targets"])

    assert md.startswith("# star_attention on ")
    assert "## Targets" in md and "## Results" in md
    for case, mode in g.QUICK_UNITS:
        assert f"### {case} {g.MODES[mode]}: " in md
    assert md.count("| provider | median ms | µs | × floor |") == len(g.QUICK_UNITS)
    for name in providers:
        assert f"| {name}" in md


def test_benchmark_reports_wrong_and_failing_providers(tmp_path, monkeypatch):
    def broken(unit):
        def fn(q, k, v):
            raise RuntimeError("kernel exploded")

        return fn

    fake = {"wrong": lambda unit: lambda q, k, v: q + 0 * (k + v), "broken": broken}  # not attention
    monkeypatch.setattr(g, "PROVIDERS", fake)
    argv = ["--smoke", "--cases", "llava-b16", "--providers", "wrong,broken", "--out", str(tmp_path)]
    assert g.main(argv) == 3
    stem = "smoke-cuda" if torch.cuda.is_available() else "smoke-cpu"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    for u in data["units"]:
        rows = {r["provider"]: r for r in u["rows"]}
        assert rows["wrong"]["status"] == "WRONG" and "median_ms" not in rows["wrong"]  # not timed
        assert "relative error" in rows["wrong"]["reason"]
        assert rows["broken"]["status"] == "ERROR" and "kernel exploded" in rows["broken"]["reason"]
    assert "WRONG: out relative error" in (tmp_path / f"{stem}.md").read_text()


def test_triton_tile_sweep(tmp_path):
    """--sweep: the triton backend at each sweep configuration and the table's, checked, then timed
    (ok under TRITON_INTERPRET=1; without it, every sweep says why it did not run)."""
    argv = ["--smoke", "--cases", "llava-b16", "--providers", "htc triton", "--out", str(tmp_path)]
    assert g.main(["--sweep", *argv]) == 0
    stem = "smoke-cuda" if torch.cuda.is_available() else "smoke-cpu"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    md = (tmp_path / f"{stem}.md").read_text()
    sweeps = data["sweeps"]
    assert [(e["case"], e["mode"]) for e in sweeps] == [x for x in g.SWEEP_UNITS if x[0] == "llava-b16"]
    assert "## Triton tile sweep" in md
    for e in sweeps:
        if e.get("skipped"):
            assert not torch.cuda.is_available() and "TRITON_INTERPRET" in e["skipped"]
            continue
        configs = [tuple(r["config"]) for r in e["rows"]]
        assert set(g.SMOKE_SWEEP_TILES) | {tuple(e["table"])} == set(configs)
        assert sum(r["is_table"] for r in e["rows"]) == 1
        for r in e["rows"]:
            assert r["status"] == "ok", r
            assert all(r["rel_err"][k] <= r["tolerance"][k] for k in r["rel_err"])
        assert "(table)" in md and "speed-up vs table" in md
    assert g.main(["--quick", *argv]) == 0
    assert json.loads((tmp_path / f"{stem}.json").read_text())["sweeps"] == []  # --quick: no sweep


def _unit(case, mode, times_us: dict, hbm_spec_us=100.0):
    rows = [{"provider": p, "status": "ok", "median_ms": t / 1e3} for p, t in times_us.items()]
    rows.append({"provider": "xformers bias", "status": "SKIP", "reason": "not installed"})
    return {"case": case, "mode": mode, "floors": {"hbm_spec_us": hbm_spec_us}, "rows": rows}


def test_profile_runs_check_then_run_and_refuse_bad_units(capsys):
    """--profile (what gpu_check.sh runs under ncu): each unit is checked against the reference first;
    a backend that cannot run is an ERROR (exit 3), a malformed unit exit 2."""
    assert g.main(["--smoke", "--profile", "llava-b16:fwd:reference,16img:fwdbwd:reference"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"ran {g.PROFILE_ITERS}x") == 2
    assert g.main(["--smoke", "--profile", "llava-b16:fwd:no-such-backend"]) == 3
    assert "[profile] llava-b16 fwd no-such-backend: ERROR" in capsys.readouterr().out
    assert g.main(["--smoke", "--profile", "llava-b16:bwd:cpu"]) == 2


def test_targets_arithmetic():
    units = [
        _unit("llava-b16", "fwd", {"htc cuda": 120.0, "flex compiled": 150.0, "sdpa dense mask": 700.0}),
        _unit("llava-b16", "fwdbwd", {"htc cuda": 460.0, "flex compiled": 1000.0, "sdpa dense mask": 2000.0}),
        _unit("16img", "fwd", {"htc cuda": 100.0, "sdpa causal (flash)": 950.0}),
    ]
    units[0]["rows"].append({"provider": "htc triton", "status": "SKIP", "reason": "no triton"})
    res = g.check_targets(units)
    cuda = {(t["case"], t["mode"], t["kind"], t["peer"]): t for t in res if t["htc"] == "htc cuda"}
    verdicts = {k: v["verdict"] for k, v in cuda.items()}
    assert verdicts == {
        ("llava-b16", "fwd", "floor", None): "PASS",  # 120 <= 1.3 x 100
        ("llava-b16", "fwdbwd", "max_us", None): "FAIL",  # 460 > 450
        ("llava-b16", "fwd", "speedup", "flex compiled"): "FAIL",  # 1.25x < 1.3x
        ("llava-b16", "fwdbwd", "speedup", "flex compiled"): "PASS",
        ("llava-b16", "fwd", "speedup", "sdpa dense mask"): "PASS",  # 5.83x
        ("llava-b16", "fwdbwd", "speedup", "sdpa dense mask"): "FAIL",  # 4.35x
        ("16img", "fwd", "speedup", "flex compiled"): "N/A",  # flex not in that unit
        ("16img", "fwd", "speedup", "sdpa causal (flash)"): "PASS",  # 9.5x
    }
    assert cuda[("llava-b16", "fwd", "floor", None)]["measured"] == pytest.approx(1.2)
    triton = [t for t in res if t["htc"] == "htc triton"]
    assert len(triton) == 1 and triton[0]["verdict"] == "N/A" and "no triton" in triton[0]["detail"]


# The layout of `ncu --import rep --page source --csv --print-source sass` (one block per launch),
# with a profiler message before it and the "-" of an empty cell.
_SASS_CSV = """==PROF== Connected to process 1234
"Kernel Name","void htc::star_cuda::star_row_kernel<Cfg>(StarParams)"
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",\
"stall_barrier","stall_long_sb","stall_long_sb (Not Issued)"
"0x7f0000000000","      IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ","2","1","0","0","0"
"0x7f0000000010","      @!P2 LDG.E.U8 R17, desc[UR8][R14.64] ","-","-","-","-","-"
"0x7f0000000020","      DEPBAR.LE SB0, 0x0 ","60","50","0","55","50"
"0x7f0000000030","      BAR.SYNC.DEFER_BLOCKING 0x0 ","38","30","38","0","0"
"Kernel Name","void htc::star_cuda::star_combine_kernel<(Elt)1, 128>(StarParams)"
"Address","Source","Warp Stall Sampling (All Samples)"
"0x7f0000100000","      EXIT ","0"
"""


def test_ncu_stalls_summary():
    launches = ncu_stalls.parse(_SASS_CSV)
    assert [len(la.rows) for la in launches] == [4, 1]
    md = ncu_stalls.report(_SASS_CSV)
    assert "100 samples" in md and "star_row_kernel" in md
    # by opcode, hottest first; predicates and modifiers stripped
    assert md.index("| DEPBAR | 60 | 60.0% |") < md.index("| BAR | 38 | 38.0% |")
    assert "| LDG | 0 | 0.0% |" in md
    # per instruction: offset from the kernel's first one, its main reasons ("Not Issued" ignored)
    assert "| 0x0020 | 60 | 60.0% | long_sb 92% | `DEPBAR.LE SB0, 0x0` |" in md
    assert "| 0x0030 | 38 | 38.0% | barrier 100% |" in md
    assert "Stall reasons over the kernel: long_sb 55.0%, barrier 38.0%." in md
    assert "No samples." in md  # the second launch
    assert "No launch" in ncu_stalls.report("==PROF== nothing\n")
    no_column = '"Kernel Name","k"\n"Address","Source"\n"0x10","EXIT"\n'
    assert "No stall-sampling column" in ncu_stalls.report(no_column)


def test_script_syntax_and_options():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    subprocess.run([bash, "-n", str(SCRIPT)], check=True)
    help_text = subprocess.run([bash, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    for opt in ("--quick", "--skip-build", "--skip-tests", "--no-profile", "--smoke", "--sanitize"):
        assert opt in help_text.stdout
    bad = subprocess.run([bash, str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_script_sanitize_tests_exist():
    """--sanitize names its tests by node id: each must still be collected (or the GPU run checks nothing)."""
    ids = re.findall(r'"(tests/test_star_attention\.py::[^"]+)"', SCRIPT.read_text())
    assert len(ids) >= 8
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert all(i in res.stdout for i in ids)


def test_script_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    res = subprocess.run([shellcheck, "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
