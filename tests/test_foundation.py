"""Build/packaging: the extension, torch.ops.htc registration, info, and the no-extension fallback."""

import os
import subprocess
import sys

import pytest
import torch

import htc_kernels as hk
from htc_kernels import _ext


def test_extension_loaded_in_ci():
    # CI builds the extension; a silent pure-Python install would make every kernel test vacuous.
    assert _ext.available(), _ext.LOAD_ERROR


def test_ops_registered():
    for name in ("star_plan", "star_attention", "star_attention_backward"):
        assert hasattr(torch.ops.htc, name)


def test_cuda_compiled_in_ci():
    if os.environ.get("CI") != "true":
        pytest.skip("only asserted in CI, where the CUDA extension must compile and link")
    build = _ext.build_info()
    assert build["cuda"] and build["cuda_archs"] == "8.0;9.0"


def test_info_reports():
    data = hk.info()
    assert data["torch"] == torch.__version__
    assert data["extension_loaded"] is True
    assert data["backends"]["reference"] == "yes"
    out = subprocess.run(
        [sys.executable, "-m", "htc_kernels.info"], capture_output=True, text=True, check=True
    )
    assert "extension_loaded" in out.stdout and "backends" in out.stdout
    assert "RuntimeWarning" not in out.stderr


def test_import_without_extension_warns_and_reference_works():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import htc_kernels as hk\n"
        "assert sum('extension not loaded' in str(x.message) for x in w) == 1, [str(x.message) for x in w]\n"
        "assert not hk.info()['extension_loaded']\n"
        "layout = hk.StarLayout(torch.tensor([0, 1, 1, 2, 0]))\n"
        "q = torch.randn(1, 2, 5, 8, dtype=torch.float64)\n"
        "out = hk.star_attention(q, q, q, layout)\n"
        "ref = hk.star_attention_reference(q, q, q, layout)\n"
        "assert torch.equal(out, ref)\n"
        "try:\n"
        "    hk.star_attention(q.float(), q.float(), q.float(), layout, backend='cpu')\n"
        "    raise SystemExit('cpu backend ran without the extension')\n"
        "except ValueError as e:\n"
        "    assert 'extension is not loaded' in str(e), e\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HTC_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_info_callable_twice():
    assert hk.info()["extension_loaded"] == hk.info()["extension_loaded"]
    import htc_kernels.info  # noqa: F401  (the CLI module must not shadow the function)

    assert callable(hk.info) and isinstance(hk.info(), dict)
