"""Backend selection, the missing-extension fallback, `vpfast info` and the CLI."""
import os
import subprocess
import sys

import pytest
import torch

import vpfast
from vpfast import _dispatch
from vpfast.ops.ddr_loss import OP


def _run(code: str, **env):
    full = dict(os.environ, **env)
    full.pop("VPFAST_QUIET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_resolve_reads_environment(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "torch")
    assert _dispatch.resolve(None) == "torch"
    monkeypatch.delenv("VPFAST_BACKEND")
    assert _dispatch.resolve(None) == "auto"
    assert _dispatch.resolve("CPP") == "cpp"
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve("gpu")


def test_environment_backend_is_used(monkeypatch):
    x = torch.rand(1, 3, 1, 4, 4)
    monkeypatch.setenv("VPFAST_BACKEND", "torch")
    assert OP.select(None, x, x, 0.1, 1e-12)[0] == "torch"


def test_auto_prefers_compiled_kernel_on_cpu():
    x = torch.rand(1, 3, 1, 4, 4)
    expected = "torch" if OP.static_reasons("cpp") else "cpp"
    assert OP.select("auto", x, x, 0.1, 1e-12)[0] == expected


def test_auto_falls_back_for_unsupported_dtype():
    x = torch.rand(1, 3, 1, 4, 4, dtype=torch.bfloat16)
    assert OP.select("auto", x, x, 0.1, 1e-12)[0] == "torch"
    if not OP.static_reasons("cpp"):
        with pytest.raises(vpfast.BackendUnavailable, match="cpp supports"):
            OP.select("cpp", x, x, 0.1, 1e-12)


def test_every_reason_is_listed():
    x = torch.rand(1, 3, 1, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(vpfast.BackendUnavailable) as info:
        OP.select("cuda", x, x, 0.1, 1e-12)
    msg = str(info.value)
    # the static reason (no CUDA) and the input reasons (device, dtype) are all there
    assert "cuda needs cuda tensors" in msg or "CUDA" in msg
    assert "bfloat16" in msg
    assert msg.count(";") >= 1


def test_import_without_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['vpfast._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import vpfast, torch\n"
        "    import vpfast.ops\n"
        "msgs = [str(x.message) for x in w if 'vpfast' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'not built' in msgs[0], msgs\n"
        "x = torch.rand(2, 4, 1, 5, 5)\n"
        "y = torch.rand(2, 4, 1, 5, 5)\n"
        "out = vpfast.ops.ddr_loss(x, y)\n"
        "assert torch.allclose(out, vpfast.ops.ddr_loss_reference(x, y))\n"
        "try:\n"
        "    vpfast.ops.ddr_loss(x, y, backend='cpp')\n"
        "except vpfast.BackendUnavailable as e:\n"
        "    assert 'not built' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('cpp should be unavailable')\n"
        "import vpfast.info\n"
        "r = vpfast.info.report()\n"
        "assert 'NOT loaded' in r, r\n"
        "print('ok')\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_import_without_triton():
    res = _run("import sys; sys.modules['triton'] = None\nimport vpfast, vpfast.info\n"
               "assert not vpfast._ext.TRITON_INSTALLED\nprint(vpfast.info.report())")
    assert res.returncode == 0, res.stderr
    assert "Triton is not installed" in res.stdout


def test_info_report_lists_ops_and_build():
    import vpfast.info

    text = vpfast.info.report()
    assert "ddr_loss" in text and "torch" in text and "CPU capability" in text and "threads" in text
    if vpfast._ext.LOAD_ERROR is None:
        assert "extension vpfast._C: loaded" in text and "with_cuda" in text


def test_cli_info_and_module_entry_points():
    for cmd in ([sys.executable, "-m", "vpfast.info"], [sys.executable, "-m", "vpfast", "info"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert "ddr_loss" in res.stdout


def test_cli_bench_rejects_unknown_suite():
    res = subprocess.run([sys.executable, "-m", "vpfast", "bench", "no_such_op"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert "unknown suite" in res.stderr


def test_bench_table_ratios():
    from vpfast.bench import table

    rows = [
        {"group": "g", "name": "a", "stats": {"median": 2.0}, "extra_info": {"provider": "eager", "gbytes": 4.0}},
        {"group": "g", "name": "b", "stats": {"median": 0.5}, "extra_info": {"provider": "cpp", "gbytes": 4.0,
                                                                             "peak_mb": 1.5}},
    ]
    text = table(rows)
    assert "4.00x" in text and "8.0" in text and "1.5" in text
