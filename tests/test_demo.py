"""The demo's summary tells the whole comparison with the baselines (each metric, better or worse), and where a
short run stands against longer training it quotes numbers measured and documented (docs/TRAINING.md), never
an unmeasured promise."""
import os
import re
from types import SimpleNamespace

from vpfast import commands

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "TRAINING.md")
# the 300-step demo run of docs/TRAINING.md (1,000 test sequences)
SHORT = {"model": {"mse": 127.82, "mae": 309.42, "ssim": 0.5179, "psnr": 15.24},
         "zeros": {"mse": 176.44, "mae": 204.64, "ssim": 0.7767, "psnr": 13.80},
         "last": {"mse": 288.58, "mae": 341.25, "ssim": 0.6574, "psnr": 11.71}}


def test_verdict_names_the_metrics_the_model_loses_on():
    text = commands.demo_verdict(SHORT)
    assert "against predicting zeros (all-black frames): MSE 1.38x lower (better), MAE 1.51x higher (worse), " \
           "SSIM 0.518 vs 0.777 (worse)" in text
    assert "against repeating the last frame: MSE 2.26x lower (better), MAE 1.10x lower (better)" in text
    assert "still loses to the zeros baseline on MAE and SSIM" in text


def test_short_runs_quote_the_measured_longer_run():
    longer = commands.DEMO_LONGER
    assert longer is not None and longer["steps"] > commands.DEMO_MIN_STEPS
    text = commands.demo_verdict(SHORT, 300, longer)
    assert f"after {longer['steps']} steps MSE {longer['model']['mse']:.1f}" in text
    # a run as long as the measured one (or longer) has its own numbers to show
    assert "Longer training" not in commands.demo_verdict(SHORT, longer["steps"], longer)
    assert "Longer training" not in commands.demo_verdict(SHORT, 300, None)


def test_longer_run_is_quoted_only_for_the_measured_setup():
    args = dict(model=commands.DEMO_MODEL, preset=commands.DEMO_PRESET, config=None, batch_size=commands.DEMO_BATCH,
                lr=commands.DEMO_LR, seed=0, test_size=1000)
    assert commands._demo_defaults(SimpleNamespace(**args))
    for k, v in (("model", "convlstm"), ("batch_size", 16), ("test_size", 100), ("config", '{"hid_S": 8}')):
        assert not commands._demo_defaults(SimpleNamespace(**dict(args, **{k: v}))), k


def _doc_row(label):
    with open(DOC) as f:
        rows = [line for line in f if line.startswith(f"| {label} |")]
    assert len(rows) == 1, (label, rows)
    return [float(c) for c in rows[0].strip().strip("|").split("|")[1:]]


def test_the_quoted_numbers_are_the_documented_measurement():
    longer = commands.DEMO_LONGER
    want = [round(longer["model"][k], 4 if k == "ssim" else 2) for k in ("mse", "mae", "ssim", "psnr")]
    assert _doc_row(f"TAU small, {longer['steps']} steps × 8 sequences") == want
    zeros = [round(longer["zeros"][k], 4 if k == "ssim" else 2) for k in ("mse", "mae", "ssim", "psnr")]
    assert _doc_row("zeros (baseline)") == zeros
    assert _doc_row(f"TAU small, {commands.DEMO_MIN_STEPS} steps × 8 sequences") == \
        [SHORT["model"][k] for k in ("mse", "mae", "ssim", "psnr")]
    with open(DOC) as f:
        section = f.read().split("## The demo, measured", 1)[1]
    assert re.search(r"Measured \d{4}-\d{2}-\d{2}", section), "the section says when it was measured"
