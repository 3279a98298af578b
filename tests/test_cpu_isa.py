"""Runtime ISA dispatch of the CPU kernels (csrc/common/cpu_dispatch.h, README "CPU kernels").

* Every variant this CPU can run passes the star_attention and mgvq_lookup test matrices (against the
  float64 reference, tests/test_star_attention.py and test_mgvq_lookup.py), each in a child process
  started with HTC_CPU_ISA=<variant> (the variant is chosen once, at load). The variant chosen by default
  is the one the rest of the suite runs; the others get a child each. Variants this CPU cannot run are
  skipped with the reason.
* A forced variant that is unknown, not compiled in, or that this CPU cannot run is an error on use.
* No code compiled for a higher ISA can run before the dispatcher chose it: what the baseline objects
  define (and so may call) has no AVX2/AVX-512 register in the built library.
* bf16 tiles (HTC_CPU_BF16_TILES): the bf16 forward's and backward's GEMMs on bf16 pairs (every head
  dim) pass the star_attention matrix with the dot products emulated (any AVX-512 CPU), they do change
  the arithmetic of the output and of each gradient (so the path ran), the AVX512-BF16 instruction gives
  the emulation's bits where the CPU has it, and bad values are errors.
* AMX tiles (HTC_CPU_BF16_TILES=amx_emulate / amx): the AMX tile kernel on its emulated tile unit passes the
  star_attention matrix (forward and backward) and changes the bits (it ran); amx is refused where the amx
  variant does not run; on AMX hardware the instructions agree with the emulation to rounding (skipped
  elsewhere).
"""

import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import htc_kernels as hk
from htc_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.LOAD_ERROR}")
ISA = _ext.cpu_isa() if _ext.available() else {}
VARIANTS = ["avx2", "avx512", "avx512_bf16", "amx"]
# The kernel test matrices, CPU cases only (the Triton interpreter and CUDA cases do not depend on the
# CPU variant).
MATRIX = ["tests/test_star_attention.py", "tests/test_mgvq_lookup.py"]


def child(isa: str, code: str, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HTC_CPU_ISA=isa, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)


def child_error(isa: str, setup: str, call: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``setup`` then ``call`` in a child with HTC_CPU_ISA=isa; the call must raise, and the child
    prints ``<exception type> <message>`` (a call that returns fails the child)."""
    code = (
        f"{setup}try:\n    {call}\nexcept Exception as e:\n"
        "    print(type(e).__name__, e); raise SystemExit(0)\n"
        "raise SystemExit('no error')\n"
    )
    r = child(isa, code, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@needs_ext
def test_info_names_the_variant_in_use():
    info = hk.info()
    assert info["cpu_isa"] == ISA["active"], (info["cpu_isa"], ISA)
    assert ISA["active"] in ISA["runnable"] and ISA["active"] in ISA["compiled"], ISA
    assert hk.info()["compiled_cpu_isa"] == " ".join(ISA["compiled"])
    if not os.environ.get("HTC_CPU_BF16_TILES"):
        assert info["cpu_bf16_tiles"] == "fp32"  # bf16 tiles are opt-in
    if not os.environ.get("HTC_CPU_ISA"):
        # By default the best variant this CPU runs (the list is lowest first).
        assert ISA["active"] == ISA["runnable"][-1], ISA


@needs_ext
@pytest.mark.parametrize("value", ["avx1024", "AVX2", ""])
def test_unknown_value_is_an_error(value):
    if value == "":  # empty means unset: the default choice
        r = child(value, "from htc_kernels import _ext; print(_ext.cpu_isa()['active'])")
        assert r.returncode == 0 and r.stdout.strip() == ISA["runnable"][-1], r.stderr
        return
    setup = "import torch, htc_kernels as hk\nz = torch.randn(3, 2, 4); cb = torch.randn(2, 8, 4)\n"
    r = child_error(value, setup, "hk.mgvq_lookup(z, cb, backend='cpu')")
    assert "ValueError" in r.stdout, r.stdout
    assert f"HTC_CPU_ISA={value} is not a CPU kernel variant" in r.stdout, r.stdout
    assert "HTC_CPU_ISA" in r.stderr  # the import warned too


@needs_ext
@pytest.mark.parametrize("isa", VARIANTS)
def test_variant_the_cpu_cannot_run_is_an_error(isa):
    if isa in ISA["runnable"] or isa not in ISA["compiled"]:
        pytest.skip(f"{isa} runs here or is not compiled in")
    setup = (
        "import torch, htc_kernels as hk\n"
        "from htc_kernels import _ext\n"
        "assert _ext.cpu_isa()['active'] == '', _ext.cpu_isa()\n"
        "q = torch.randn(1, 1, 8, 16)\n"
        "layout = hk.StarLayout(torch.zeros(8, dtype=torch.long))\n"
    )
    r = child_error(isa, setup, "hk.star_attention(q, q, q, layout, backend='cpu')")
    assert f"HTC_CPU_ISA={isa}: this CPU cannot run that variant" in r.stdout, r.stdout


def run_matrix(files: list[str], select: str, **env: str) -> None:
    """pytest ``files -k select`` in a child with ``env``; it must pass (and run something)."""
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider"]
    full = dict(os.environ, PYTHONPATH=ROOT, **env)
    r = subprocess.run([*cmd, "-k", select], env=full, cwd=ROOT, capture_output=True, text=True)
    tail = "\n".join(r.stdout.splitlines()[-15:])
    assert r.returncode == 0, f"{env}:\n{tail}\n{r.stderr[-2000:]}"
    assert re.search(r"\d+ passed", tail), tail


@needs_ext
@pytest.mark.parametrize("isa", VARIANTS)
def test_every_runnable_variant_passes_the_kernel_matrix(isa):
    if isa not in ISA["compiled"]:
        pytest.skip(f"{isa} is not compiled in this build (variants: {ISA['compiled']})")
    if isa not in ISA["runnable"]:
        pytest.skip(f"this CPU cannot run {isa} (it has: {ISA['cpu_features']})")
    if isa == ISA["active"]:
        pytest.skip(f"{isa} is the variant this process runs: the rest of the suite tests it")
    r = child(isa, "from htc_kernels import _ext; print(_ext.cpu_isa()['active'])")
    assert r.stdout.strip() == isa, r.stdout + r.stderr
    run_matrix(MATRIX, "not triton and not cuda", HTC_CPU_ISA=isa)


# --- bf16 tiles -----------------------------------------------------------------------------------
AVX512 = [v for v in ("avx512", "avx512_bf16", "amx") if v in ISA.get("runnable", [])]
needs_avx512 = pytest.mark.skipif(not AVX512, reason="no AVX-512 variant runs here (bf16 tiles need one)")
# One bf16 forward and backward at a LLaVA-like layout (text, images, <voco>, padding; GQA; head dim D from
# argv): FULL, CAUSAL, MASKED and DIAG tiles, thin <voco> rows. Prints, as JSON, the mode, each output's
# error (out against float64, gradients against what the backward computes exactly from the stored output:
# tests/accuracy.py) and its bytes, hashed.
BF16_RUN = """
import hashlib, json, sys, torch, htc_kernels as hk
from htc_kernels import _ext
from tests.accuracy import rel, stored_output_grads
from tests.layouts import llava_kinds
torch.manual_seed(0)
d = int(sys.argv[1])
layout = hk.StarLayout(llava_kinds(prefix=37, visual=150, voco=2, suffix=51))
s = layout.seq_len
q, k, v = (torch.randn(1, h, s, d).bfloat16().requires_grad_() for h in (4, 2, 2))
g = torch.randn(1, 4, s, d).bfloat16()
out = hk.star_attention(q, k, v, layout, backend="cpu")
out.backward(g)
ref = hk.star_attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), layout)
want = stored_output_grads(q, k, v, layout, None, None, out, g.double())
errs = {"out": rel(out, ref)} | {n: rel(x.grad, w) for n, x, w in zip(("dq", "dk", "dv"), (q, k, v), want)}
bits = {n: hashlib.sha1(x.detach().view(torch.int16).numpy().tobytes()).hexdigest()
        for n, x in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad))}
print(json.dumps({"mode": _ext.cpu_isa()["bf16_tiles"], "err": errs, "bits": bits}))
"""
OUTPUTS = ("out", "dq", "dk", "dv")


@functools.cache
def bf16_run(isa: str, tiles: str, d: int) -> dict:
    r = child(isa, BF16_RUN.replace("sys.argv[1]", str(d)), HTC_CPU_BF16_TILES=tiles)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@needs_ext
@needs_avx512
def test_bf16_tiles_emulated_pass_the_star_matrix():
    """The whole star_attention matrix (CPU cases) with the bf16 calls on emulated bf16 tiles: forward and
    gradients against float64 (DESIGN.md §6's bf16 bound) at every head dim it has (odd ones included),
    GQA, decode, soft-capping, the backward's split over query tiles, masked means never read."""
    run_matrix(["tests/test_star_attention.py"], "not triton and not cuda", HTC_CPU_BF16_TILES="emulate")


@needs_ext
@needs_avx512
@pytest.mark.parametrize("d", [64, 37])
@pytest.mark.parametrize("outputs", [("out",), ("dq", "dk", "dv")], ids=["forward", "backward"])
def test_bf16_tiles_change_the_arithmetic_within_tolerance(outputs, d):
    """The emulated bf16 tiles give other bits than the fp32-widened tiles, in the forward's output and in
    each gradient, even and odd head dims (P and dS are rounded to bf16 before their GEMMs: the path ran,
    it was not replaced by the fp32 tiles), with an error of the same size (the matrix checks the bound)."""
    isa = AVX512[-1]
    base, emulated = bf16_run(isa, "", d), bf16_run(isa, "emulate", d)
    assert (base["mode"], emulated["mode"]) == ("fp32", "emulated")
    for name in outputs:
        assert emulated["bits"][name] != base["bits"][name], name
        assert emulated["err"][name] < 2 * base["err"][name] + 1e-3, (name, emulated["err"], base["err"])


@needs_ext
@pytest.mark.skipif("avx512_bf16" not in ISA.get("runnable", []), reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("d", [64, 37])
def test_bf16_tiles_dpbf16_give_the_emulated_bits(d):
    """On a CPU with AVX512-BF16: vdpbf16ps computes exactly what the emulation computes (no subnormal
    operands or products at these magnitudes), forward and backward, so the matrix run under emulation
    covers it."""
    isa = AVX512[-1]
    emulated, hardware = bf16_run(isa, "emulate", d), bf16_run(isa, "dpbf16", d)
    assert hardware["mode"] == "dpbf16"
    assert hardware["bits"] == emulated["bits"], (hardware, emulated)


@needs_ext
def test_bf16_tiles_bad_values_are_errors():
    setup = "import torch, htc_kernels as hk\nz = torch.randn(3, 2, 4); cb = torch.randn(2, 8, 4)\n"
    call = "hk.mgvq_lookup(z, cb, backend='cpu')"
    r = child_error("", setup, call, HTC_CPU_BF16_TILES="yes")
    assert "ValueError" in r.stdout and "HTC_CPU_BF16_TILES=yes is not a mode" in r.stdout, r.stdout
    if "avx512_bf16" not in ISA["runnable"]:
        r = child_error("", setup, call, HTC_CPU_BF16_TILES="dpbf16")
        assert "needs the avx512_bf16 or amx variant" in r.stdout, r.stdout
    if "avx2" in ISA["runnable"]:
        r = child_error("avx2", setup, call, HTC_CPU_BF16_TILES="emulate")
        assert "needs an AVX-512 variant, the variant in use is avx2" in r.stdout, r.stdout


# --- AMX tiles (HTC_CPU_BF16_TILES=amx | amx_emulate; csrc/common/gemm_amx.h) -------------------------
# The AMX tile kernel runs here on its emulated tile unit (amx_emulate). Its tails (M, N, Kp not multiples
# of 16) are covered at the GEMM level by the C++ test csrc/tests/test_gemm_amx.cpp (ctest); in the matrix,
# M tails (key and row spans) and Kp tails (head dims 16, 24, 80; odd key counts in P·V) occur, N tails
# do not (N is a multiple of 16 in both GEMMs).
# BF16_FORWARD's case through the raw op, saving out and lse (fp32: its bits show the fp32 scores'
# summation order, which out, rounded to bf16, mostly hides) to the file $HTC_TEST_OUT.
AMX_FORWARD = """
import os, torch, htc_kernels as hk
from htc_kernels import _ext
from tests.layouts import llava_kinds
torch.manual_seed(0)
layout = hk.StarLayout(llava_kinds(prefix=37, visual=150, voco=2, suffix=51))
s = layout.seq_len
q, k, v = (torch.randn(1, h, s, 64).bfloat16() for h in (4, 2, 2))
args = (layout.kinds, layout.groups, layout.plan(s, 64, 64), 64, 64, layout.topology_id, 64**-0.5, 0.0)
out, lse = torch.ops.htc.star_attention(q, k, v, *args)
ref = hk.star_attention_reference(q.double(), k.double(), v.double(), layout)
err = ((out.double() - ref).norm() / ref.norm()).item()
mode = _ext.cpu_isa()["bf16_tiles"]
torch.save({"mode": mode, "err": err, "out": out, "lse": lse}, os.environ["HTC_TEST_OUT"])
"""


def amx_forward(isa: str, tiles: str, tmp_path) -> dict:
    path = str(tmp_path / f"{isa}-{tiles or 'fp32'}.pt")
    r = child(isa, AMX_FORWARD, HTC_CPU_BF16_TILES=tiles, HTC_TEST_OUT=path)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(path)


def same_bits(a: dict, b: dict) -> bool:
    return torch.equal(a["out"].view(torch.int16), b["out"].view(torch.int16)) and torch.equal(
        a["lse"].view(torch.int32), b["lse"].view(torch.int32)
    )


@needs_ext
@needs_avx512
def test_amx_tiles_emulated_pass_the_star_matrix():
    run_matrix(["tests/test_star_attention.py"], "not triton and not cuda", HTC_CPU_BF16_TILES="amx_emulate")


@needs_ext
@needs_avx512
def test_amx_tiles_emulated_change_the_arithmetic_within_tolerance(tmp_path):
    """The emulated AMX tiles give other bits than the fp32-widened tiles (P rounded to bf16: the bf16 path
    ran) and than the emulated vdpbf16ps tiles (TDPBF16PS adds the low pair member first, vdpbf16ps the
    high one: the AMX kernel ran, not gemm_bf16), with an error of the fp32 tiles' size."""
    isa = AVX512[-1]
    base, dp, amx = (amx_forward(isa, t, tmp_path) for t in ("", "emulate", "amx_emulate"))
    assert (base["mode"], dp["mode"], amx["mode"]) == ("fp32", "emulated", "amx_emulated")
    assert not same_bits(amx, base) and not same_bits(amx, dp)
    assert not torch.equal(amx["lse"], dp["lse"])  # the scores' summation order
    assert amx["err"] < 2 * base["err"] + 1e-3, (amx["err"], base["err"])
    # The same products, summed in another order: the two bf16-tile modes agree to rounding.
    torch.testing.assert_close(amx["lse"], dp["lse"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(amx["out"].float(), dp["out"].float(), rtol=2**-7, atol=1e-3)


@needs_ext
@pytest.mark.skipif("amx" not in ISA.get("runnable", []), reason="this CPU has no AMX (or no OS grant)")
def test_amx_tiles_hardware_agree_with_the_emulation(tmp_path):
    """On a CPU with AMX-BF16: TDPBF16PS gives what the emulated tile unit gives, to rounding. Not
    necessarily bit for bit: the hardware may accumulate a tile's products in another order internally,
    and it flushes subnormals (the emulation does not)."""
    emulated, hardware = amx_forward("amx", "amx_emulate", tmp_path), amx_forward("amx", "amx", tmp_path)
    assert (hardware["mode"], emulated["mode"]) == ("amx", "amx_emulated")
    torch.testing.assert_close(hardware["lse"], emulated["lse"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hardware["out"].float(), emulated["out"].float(), rtol=2**-7, atol=1e-3)
    errs = hardware["err"], emulated["err"]
    assert abs(errs[0] - errs[1]) <= 0.05 * errs[1], errs
    # And the whole matrix on the instructions.
    env = {"HTC_CPU_ISA": "amx", "HTC_CPU_BF16_TILES": "amx"}
    run_matrix(["tests/test_star_attention.py"], "not triton and not cuda", **env)


@needs_ext
def test_amx_tiles_refused_where_amx_does_not_run():
    """HTC_CPU_BF16_TILES=amx needs the amx variant: any other variant refuses it on every CPU op call
    (a ValueError naming the variant in use), never a quiet fallback; amx_emulate needs AVX-512."""
    setup = "import torch, htc_kernels as hk\nz = torch.randn(3, 2, 4); cb = torch.randn(2, 8, 4)\n"
    call = "hk.mgvq_lookup(z, cb, backend='cpu')"
    others = [v for v in ISA["runnable"] if v != "amx"]
    if not others:
        pytest.skip("only the amx variant runs here")
    for isa in others:
        r = child_error(isa, setup, call, HTC_CPU_BF16_TILES="amx")
        assert "ValueError" in r.stdout, r.stdout
        want = "HTC_CPU_BF16_TILES=amx needs the amx variant (AMX-TILE and AMX-BF16, granted by the OS)"
        assert f"{want}, the variant in use is {isa}" in r.stdout, r.stdout
    if "avx2" in ISA["runnable"]:
        r = child_error("avx2", setup, call, HTC_CPU_BF16_TILES="amx_emulate")
        assert "needs an AVX-512 variant, the variant in use is avx2" in r.stdout, r.stdout


# --- No higher-ISA code before dispatch --------------------------------------------------------------
# ymm/zmm/opmask/tile registers: AVX2, AVX-512 and AMX code. The baseline units are compiled for plain
# x86-64, so none of what they define may use them, whichever object's copy of a shared inline function
# the linker kept.
WIDE = re.compile(r"%(ymm|zmm|tmm)\d+|%k[1-7]\b")


def _objects():
    so = hk._C.__file__ if hasattr(hk, "_C") else _ext._C.__file__
    temps = glob.glob(os.path.join(ROOT, "build", "python", "temp.*"))
    base = []
    for t in temps:
        for o in glob.glob(os.path.join(t, "csrc", "**", "*.o"), recursive=True):
            # Objects of sources that no longer exist are left over from older builds: not in the .so.
            src = os.path.join(ROOT, os.path.relpath(o, t))[: -len(".o")]
            if "/isa_" not in o and any(os.path.exists(src + ext) for ext in (".cpp", ".cu")):
                base.append(o)
    return so, base


@needs_ext
@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="needs binutils")
def test_baseline_code_has_no_avx():
    isa = _ext.cpu_isa()
    if isa["compiled"] == ["native"]:
        pytest.skip("built with HTC_CPU_ARCH (one -march for everything): no baseline to check")
    so, objects = _objects()
    objects = [o for o in objects if os.path.getmtime(o) <= os.path.getmtime(so)]
    if not any(o.endswith("cpu_dispatch.o") for o in objects):
        pytest.skip("the build's object files are not in build/python (built elsewhere)")
    names = set()
    for o in objects:
        out = subprocess.run(["nm", "--defined-only", o], capture_output=True, text=True, check=True).stdout
        names |= {ln.split()[-1] for ln in out.splitlines() if ln.split()[1:2] and ln.split()[1] in "TtWw"}
    dump = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True, check=True
    ).stdout
    bad, seen, current, static_init = [], 0, None, []
    for line in dump.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            current = m.group(1)
            seen += current in names
            continue
        if current is None or not WIDE.search(line):
            continue
        init = current.startswith("_GLOBAL__sub_I") or "__static_initialization" in current
        if current in names or init:
            (static_init if init else bad).append(current)
            current = None  # one report per function
    assert seen > 100, f"only {seen} baseline symbols found in {so}"
    assert not bad, f"baseline functions with AVX2/AVX-512 code: {sorted(set(bad))[:20]}"
    # Static initializers run at load, before any dispatch: none may hold wide-register code.
    assert not static_init, f"static initializers with AVX code: {sorted(set(static_init))}"
