"""`python -m vpfast.check`: its CPU path end to end at tiny shapes, the test-subset runner, and the summary."""
import json
import os
import sys
import textwrap

import pytest
import torch

from vpfast import check
from vpfast.ops.ddr_loss import OP as DDR


@pytest.fixture
def one_thread():
    # the CPU check's timings at tiny shapes: one thread keeps them from waiting on a busy second core
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cpu_check_every_case(tmp_path, capsys, one_thread):
    """Every op's case builds, runs eager and the CPU backend, reports auto's pick; JSON and summary last."""
    out = tmp_path / "check.json"
    rc = check.main(["--device", "cpu", "--no-tests", "--quick", "--out", str(out)])
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert rc == 0, text
    names = [c.name for c in check._cases()]
    assert [r["case"] for r in data["bench"]] == names and len(names) >= 13
    cpp_ok = not DDR.static_reasons("cpp")
    for row in data["bench"]:
        assert row["dtype"] == "float32" and row["results"]["torch"]["ratio"] == 1.0
        assert row["results"]["torch"]["ms"] > 0 and row["results"]["torch"]["gbps"] > 0
        assert set(row["results"]) == {"torch", "cpp"}
        assert ("ms" in row["results"]["cpp"]) == cpp_ok, row
        assert row["auto"]["backend"] in ("cpp", "torch")
        if row["auto"]["backend"] == "cpp":
            assert row["auto"]["ratio"] == row["results"]["cpp"]["ratio"]
    assert data["environment"]["device"] == "cpu" and data["tests"] is None
    # the summary comes last: after the progress lines, the table, then the flags and where the JSON went
    tail = text[text.index("vpfast check (cpu)"):]
    assert "tests      not run" in tail and "ddr_loss (2,4,1,8,8)" in tail and "cpp ms / ratio / GB/s" in tail
    assert text.rstrip().splitlines()[-1].startswith("total")
    assert f"results written to {out}" in tail


def test_cpu_check_auto_matches_dispatch(one_thread):
    case = next(c for c in check._cases() if c.name == "ddr_loss")
    row = check.bench_case(case, "cpu", torch.float32, tiny=True, timing=(1, 2, 0.0))
    p, y = [t for t, _ in case.inputs(True)]
    assert row["auto"]["backend"] == DDR.select("auto", p, y, 0.1, 1e-12)[0]
    assert row["shape"] == case.tiny_shape
    # a dtype the CPU kernels do not take: cpp reported n/a with dispatch's reason, auto falls back to torch
    row = check.bench_case(case, "cpu", torch.bfloat16, tiny=True, timing=(1, 2, 0.0))
    assert "skipped" in row["results"]["cpp"] and row["auto"]["backend"] == "torch"


def test_check_refuses_a_missing_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert check.main(["--device", "cuda", "--no-tests", "--out", "-"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert check.main(["--device", "cpu", "--dtypes", "int7", "--out", "-"]) == 2


def test_flags_and_table():
    rows = [
        {"case": "a", "op": "a", "shape": "(1,)", "dtype": "float32",
         "results": {"torch": {"ms": 1.0, "gbps": 2.0, "ratio": 1.0}, "cuda": {"ms": 2.0, "gbps": 1.0, "ratio": 0.5},
                     "triton": {"error": "RuntimeError: boom"}},
         "auto": {"backend": "cuda", "ratio": 0.5}},
        {"case": "b", "op": "b", "shape": "(1,)", "dtype": "bfloat16",
         "results": {"torch": {"ms": 1.0, "gbps": 2.0, "ratio": 1.0}, "cuda": {"ms": 0.5, "gbps": 4.0, "ratio": 2.0},
                     "triton": {"skipped": "no Triton"}},
         "auto": {"backend": "cuda", "ratio": 2.0}},
    ]
    f = check.flags(rows, {"failed": 1, "errors": 0})
    assert any("a float32: auto picks cuda, 0.50x" in x for x in f)
    assert any("backend triton raised RuntimeError: boom" in x for x in f)
    assert any("1 failed" in x for x in f)
    assert not any(x.startswith("b ") for x in f)
    table = check.format_table(rows, ("cuda", "triton"))
    assert "slower than torch" in table.splitlines()[1] and "slower" not in table.splitlines()[2]
    assert "2.00x" in table and "error" in table and "no Triton" in table


def test_test_command_selects_the_device_subset(monkeypatch):
    cmd = check.test_command("cuda", quick=True, jobs=0, paths=["tests"], junit="j.xml")
    assert cmd[cmd.index("-k") + 1] == "cuda or triton or gpu" and cmd[cmd.index("not slow") - 1] == "-m"
    assert "-n" not in cmd and cmd[-1] == "tests" and "--junitxml=j.xml" in cmd
    cmd = check.test_command("cpu", quick=False, jobs=None, paths=["tests"], junit="j.xml")
    assert cmd[cmd.index("-k") + 1] == "cpp" and "not slow" not in cmd and "-n" not in cmd
    monkeypatch.setattr(check, "_xdist_installed", lambda: True)
    cmd = check.test_command("cuda", quick=False, jobs=3, paths=["tests"], junit="j.xml")
    assert cmd[cmd.index("-n") + 1] == "3"
    monkeypatch.setattr(check, "_xdist_installed", lambda: False)
    assert "-n" not in check.test_command("cuda", quick=False, jobs=3, paths=["t"], junit="j.xml")


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?>
        <testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
        <testcase classname="tests.test_a" name="test_ok[cuda]"/>
        <testcase classname="tests.test_a" name="test_ok2"/>
        <testcase classname="tests.test_a" name="test_bad[triton]"><failure message="assert 1 == 2&#10;more">x</failure></testcase>
        <testcase classname="tests.test_a" name="test_err"><error message="fixture blew up">x</error></testcase>
        <testcase classname="tests.test_a" name="test_skip"><skipped message="no GPU">x</skipped></testcase>
        </testsuite></testsuites>"""))
    r = check.parse_junit(str(xml))
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (2, 1, 1, 1)
    assert r["failures"][0] == "tests.test_a::test_bad[triton]: assert 1 == 2"


def test_run_tests_counts_and_selection(tmp_path):
    (tmp_path / "test_fake.py").write_text(textwrap.dedent("""\
        import pytest
        def test_pass_cuda(): pass
        def test_fail_cuda(): assert 1 == 2
        def test_skip_gpu(): pytest.skip("no GPU")
        def test_other(): pass
        """))
    r = check.run_tests("cuda", jobs=0, paths=[str(tmp_path / "test_fake.py")], timeout=120)
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (1, 1, 0, 1), r
    assert "test_fail_cuda" in r["failures"][0] and r["returncode"] == 1 and not r["interrupted"]
    r = check.run_tests("cuda", jobs=0, paths=[str(tmp_path / "test_fake.py")], select="", timeout=120)
    assert r["passed"] == 2


def test_run_tests_interrupted_still_reports(tmp_path):
    """A test run over its time gets SIGINT; pytest still reports what ran."""
    (tmp_path / "test_slow.py").write_text("import time\ndef test_a(): pass\ndef test_b(): time.sleep(120)\n")
    r = check.run_tests("cpu", jobs=0, paths=[str(tmp_path / "test_slow.py")], select="", timeout=15)
    assert r["interrupted"] and r["passed"] >= 1, r
    assert any("interrupted" in f for f in check.flags([], r))


def test_module_entry_point(tmp_path):
    """`python -m vpfast check` forwards to vpfast.check (here only its argument errors: no GPU needed)."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", "vpfast", "check", "--device", "cpu", "--dtypes", "int7"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(check.__file__))))
    assert res.returncode == 2 and "--dtypes" in res.stderr
