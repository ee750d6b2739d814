"""Backend selection, the missing-extension fallback, `vpfast info` and the CLI."""
import math
import os
import subprocess
import sys
import time

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
    # the first of the op's CPU order that runs here (auto never picks Triton's interpreter)
    expected = next(b for b in OP.auto_order(device="cpu")
                    if b == "torch" or (b == "cpp" and not OP.static_reasons("cpp")))
    assert OP.select("auto", x, x, 0.1, 1e-12)[0] == expected


def test_auto_order_is_per_device():
    x = torch.rand(1, 3, 1, 4, 4)
    assert OP.auto_order((x, x)) == OP.prefer["cpu"] == OP.auto_order(device="cpu")
    assert OP.auto_order(device="cuda") == OP.prefer["cuda"]
    assert OP.auto_order() == OP.prefer["cpu"]  # no tensors: the CPU's order
    meta = torch.empty(2, device="meta")
    assert OP.auto_order((meta,)) == _dispatch.AUTO_ORDER  # a device without its own order
    assert OP.auto_order((meta, x)) == OP.prefer["cpu"]  # mixed devices: the CPU's order (the checks refuse them)


def _fake_op(prefer):
    op = _dispatch.Op("_test_fake_op", prefer=prefer)
    for b in _dispatch.BACKENDS:
        op.register(b, lambda x, b=b: b)
    return op


def test_per_device_preference_decides_auto():
    """An op that prefers torch on one device and its kernels on the other is dispatched accordingly, and
    `vpfast info`'s per-device table says the same as dispatch does."""
    import vpfast.info

    op = _fake_op({"cpu": ("triton", "torch"), "cuda": ("torch",)})
    try:
        x = torch.rand(3)
        assert op.select("auto", x)[0] == "torch"  # triton is never auto's pick for CPU tensors
        rows = {r["op"]: r for r in vpfast.info.auto_table("cpu")}
        row = rows["_test_fake_op"]
        assert row["order"] == ("triton", "torch") and row["pick"] == "torch"
        assert list(row["passed_over"]) == ["triton"] and row["passed_over"]["triton"]
        row = {r["op"]: r for r in vpfast.info.auto_table("cuda")}["_test_fake_op"]
        assert row["order"] == ("torch",) and row["pick"] == "torch" and row["passed_over"] == {}
        with pytest.raises(AssertionError):
            _dispatch.Op("_test_fake_op_bad", prefer={"cuda": ("cuda",)})  # an order must end in torch's reach
    finally:
        _dispatch.REGISTRY.pop("_test_fake_op", None)
        _dispatch.REGISTRY.pop("_test_fake_op_bad", None)


def test_auto_falls_back_for_unsupported_dtype():
    x = torch.rand(1, 3, 1, 4, 4, dtype=torch.bfloat16)
    assert OP.select("auto", x, x, 0.1, 1e-12)[0] == "torch"
    if not OP.static_reasons("cpp"):
        with pytest.raises(vpfast.BackendUnavailable, match="cpp supports"):
            OP.select("cpp", x, x, 0.1, 1e-12)


def test_every_reason_is_listed():
    # bfloat16 on the meta device: the CPU kernels take neither (the GPU backends take bfloat16, so cpp is the
    # backend with two input reasons on every machine, with or without a GPU or the extension)
    x = torch.empty(1, 3, 1, 4, 4, dtype=torch.bfloat16, device="meta")
    with pytest.raises(vpfast.BackendUnavailable) as info:
        OP.select("cpp", x, x, 0.1, 1e-12)
    msg = str(info.value)
    assert "cpp needs cpu tensors, got ['meta']" in msg
    assert "cpp supports" in msg and "bfloat16" in msg
    assert msg.count(";") >= 1 + len(OP.static_reasons("cpp"))


def test_select_cache_keys(monkeypatch):
    """select caches its answer per input signature: the answer still follows shapes, dtypes, devices, scalar
    arguments, $VPFAST_BACKEND and re-registration, a backend asked for by name still raises with every
    reason on each call, and arguments of other kinds run the check each time."""
    seen = []

    def check(backend, x, k=1):
        seen.append((backend, tuple(x.shape), k))
        return ["x has more than 4 elements"] if backend == "cpp" and x.numel() > 4 else []

    op = _dispatch.Op("_test_cached_op", check=check, prefer={"cpu": ("cpp", "torch")})
    try:
        for b in _dispatch.BACKENDS:
            op.register(b, lambda x, k=1, b=b: b)
        op._static.update({b: [] for b in _dispatch.BACKENDS})  # every backend "built", on any machine
        small, big = torch.rand(2, 2), torch.rand(3, 2)
        assert op.select("auto", small)[0] == "cpp" and op.select("auto", big)[0] == "torch"
        n = len(seen)
        assert op.select("auto", small)[0] == "cpp" and op.select("auto", big)[0] == "torch"
        assert len(seen) == n  # answered from the cache
        for _ in range(2):
            with pytest.raises(vpfast.BackendUnavailable, match="more than 4 elements"):
                op.select("cpp", big)
        assert op.select("auto", small.double())[0] == "cpp"  # a new dtype is a new key
        assert op.select("auto", torch.rand(2, 2, dtype=torch.bfloat16))[0] == "torch"
        n = len(seen)
        op.select("auto", small, k=2), op.select("auto", small, k=2.0), op.select("auto", small, k=True)
        assert [s[2] for s in seen[n:]] == [2, 2.0, True]  # 2, 2.0 and True are different keys
        monkeypatch.setenv("VPFAST_BACKEND", "torch")
        assert op.select(None, small)[0] == "torch"
        monkeypatch.delenv("VPFAST_BACKEND")
        assert op.select(None, small)[0] == "cpp"
        n = len(seen)
        op.select("auto", small, k=object()), op.select("auto", small, k=object())
        assert len(seen) == n + 2  # not summarised: never cached
        op.register("cpp", lambda x, k=1: "cpp2")
        op._static.update({b: [] for b in _dispatch.BACKENDS})
        assert op.select("auto", small)[1](small) == "cpp2"  # register() drops the cached answers
    finally:
        _dispatch.REGISTRY.pop("_test_cached_op", None)


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
        # blocked while built ('could not be imported'), or a tree without a build ('is not built')
        "said = lambda m: 'vpfast._C could not be imported' in m or 'vpfast._C is not built' in m\n"
        "assert said(msgs[0]), msgs\n"
        "x = torch.rand(2, 4, 1, 5, 5)\n"
        "y = torch.rand(2, 4, 1, 5, 5)\n"
        "out = vpfast.ops.ddr_loss(x, y)\n"
        "assert torch.allclose(out, vpfast.ops.ddr_loss_reference(x, y))\n"
        "try:\n"
        "    vpfast.ops.ddr_loss(x, y, backend='cpp')\n"
        "except vpfast.BackendUnavailable as e:\n"
        "    assert said(str(e)), e\n"
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


def test_info_auto_table_matches_dispatch():
    """info's per-device pick is what Op.select picks for inputs every backend takes (CPU float32 here; CUDA
    tensors on a GPU), for every registered op's order."""
    import vpfast.info
    from vpfast._dispatch import REGISTRY

    x = torch.rand(1, 3, 1, 4, 4)
    for device in vpfast.info.DEVICES:
        rows = {r["op"]: r for r in vpfast.info.auto_table(device)}
        assert set(rows) == set(REGISTRY)
        for name, row in rows.items():
            assert row["order"] == tuple(REGISTRY[name].prefer[device])
            assert row["pick"] in row["order"] or row["pick"] == "torch"
            before = row["order"][:row["order"].index(row["pick"])] if row["pick"] in row["order"] else row["order"]
            assert set(row["passed_over"]) == set(before)
        if device == "cpu" or torch.cuda.is_available():
            t = x.to(device)
            assert rows["ddr_loss"]["pick"] == OP.select("auto", t, t, 0.1, 1e-12)[0]
    if not torch.cuda.is_available():
        rows = vpfast.info.auto_table("cuda")
        assert all(r["pick"] == "torch" for r in rows)
        assert all(any("no CUDA device" in w for w in why) for r in rows for b, why in r["passed_over"].items()
                   if b != "torch" and why)


def test_info_report_per_device_sections():
    import vpfast.info

    text = vpfast.info.report()
    assert "auto on cpu (inputs on the CPU):" in text
    assert ("auto on cuda (inputs on a GPU):" if torch.cuda.is_available() else
            "auto on cuda: unavailable here (no CUDA device)") in text
    assert "order (Op.prefer)" in text and " > ".join(OP.prefer["cuda"]) in text
    # the dtypes each backend declares
    dtypes = text[text.index("dtypes each fused backend takes"):].splitlines()
    ddr = next(line for line in dtypes if line.strip().startswith("ddr_loss"))
    expect = " ".join(vpfast.info._short(d) for d in OP.dtypes["cuda"])
    assert expect in ddr and "bf16" in expect


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


def test_cli_bench_rejects_negative_paired_rounds():
    res = subprocess.run([sys.executable, "-m", "vpfast", "bench", "ddr_loss", "--paired-rounds", "-1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "--paired-rounds must be >= 0" in res.stderr


def test_bench_table_ratios():
    from vpfast.bench import table

    rows = [
        {"group": "g", "name": "a", "stats": {"median": 2.0}, "extra_info": {"provider": "eager", "gbytes": 4.0}},
        {"group": "g", "name": "b", "stats": {"median": 0.5}, "extra_info": {"provider": "cpp", "gbytes": 4.0,
                                                                             "peak_mb": 1.5}},
    ]
    text = table(rows)
    assert "4.00x" in text and "8.0" in text and "1.5" in text


def test_bench_paired_rounds_ratio():
    from vpfast.bench import paired_rounds

    out = paired_rounds({"eager": lambda: time.sleep(0.004), "cpp": lambda: time.sleep(0.001)}, rounds=3,
                        min_time=0.0)
    ratio, seconds = out["cpp"]
    assert 2.0 < ratio < 4.5 and 0.0009 < seconds < 0.003
    assert out["eager"][0] == 1.0
    assert math.isnan(paired_rounds({"cpp": lambda: None}, rounds=1)["cpp"][0])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        paired_rounds({"eager": lambda: None}, rounds=0)


def test_bench_paired_rounds_in_a_suite(tmp_path):
    """The benchmarks' conftest times each group's providers again in alternating rounds after its last test
    and records the paired ratio on every provider's result (and not with --benchmark-disable)."""
    import json
    import shutil

    from vpfast.bench import suites_dir, table

    shutil.copy(os.path.join(suites_dir(), "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_bench_fake.py").write_text(
        "import time\nimport pytest\n\n"
        "@pytest.mark.parametrize('provider', ['eager', 'cpp', 'skipped'])\n"
        "@pytest.mark.parametrize('shape', ['a', 'b'])\n"
        "def test_fake(record, benchmark, provider, shape):\n"
        "    if provider == 'skipped':\n"
        "        pytest.skip('a provider that cannot run here')\n"
        "    benchmark.group = 'fake ' + shape\n"
        "    def fn():\n"
        "        if provider == 'eager':\n"
        "            with open('eager_calls.txt', 'a') as f:\n"
        "                f.write('.')\n"
        "        time.sleep(0.003 if provider == 'eager' else 0.001)\n"
        "    record(provider, fn, memory=False)\n")
    out = tmp_path / "b.json"
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={tmp_path}",
            str(tmp_path / "test_bench_fake.py"), "--benchmark-min-rounds=2", "--benchmark-max-time=0.01"]
    # the child imports the vpfast this process runs (a checkout's, not whichever an editable install names)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(vpfast.__file__))] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    res = subprocess.run(base + [f"--benchmark-json={out}", "--paired-rounds=3"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())["benchmarks"]
    cpp = [r["extra_info"] for r in rows if r["extra_info"]["provider"] == "cpp"]
    assert len(cpp) == 2 and all(1.5 < i["paired_vs_eager"] < 4.5 and i["paired_rounds"] == 3 for i in cpp)
    assert "paired" in table(rows)
    # CI's smoke run: no timing and no pairing, each eager fn runs twice (warm-up and the one disabled call)
    (tmp_path / "eager_calls.txt").unlink()
    res = subprocess.run(base + ["--benchmark-disable"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 passed, 2 skipped" in res.stdout
    assert (tmp_path / "eager_calls.txt").read_text() == "...."


def test_missing_extension_warning_names_the_cause(tmp_path):
    # a copy of the package without any compiled _C: Python's own ImportError blames "a circular import";
    # the warning must say that the extension is not built, which file is missing, and how to build it
    import importlib.machinery
    import shutil

    src = os.path.dirname(os.path.abspath(vpfast.__file__))
    dst = tmp_path / "vpfast"
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    # an editable install's import hook would find /work/main's vpfast._C for the copy: drop it
    code = ("import sys, warnings\n"
            "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in repr(f)]\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import vpfast\n"
            "print('\\n'.join(str(x.message) for x in w if 'vpfast' in str(x.message)))\n"
            "assert vpfast.__file__.startswith(sys.argv[1]), vpfast.__file__\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("VPFAST_QUIET", None)
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    msg = res.stdout
    assert "circular" not in msg and "partially initialized" not in msg, msg
    assert "vpfast._C is not built" in msg and "_C" + importlib.machinery.EXTENSION_SUFFIXES[0] in msg, msg
    assert str(dst) in msg and "pip install --no-build-isolation -e ." in msg, msg
