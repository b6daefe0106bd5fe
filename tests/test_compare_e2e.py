"""``python -m mome.experiments.compare --quick`` end to end (tiny random backbones, 3 steps per method): the table,
the plots and the page are written; a second call retrains and re-decodes nothing; ``--report-only`` redraws the
same tables from results.json. Slow: ~3 min on 2 free cores (11 trainings, ~30 evaluations, judge, routing)."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.training_fixtures import REPO, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

OUTPUTS = ["RESULTS.md", "results.json", "table_clean.md", "table_clean.csv", "table_noise.md", "table_noise.csv",
           "wer_vs_scale.png", "wer_vs_snr.png", "routing_jsd.png", "routing/usage_all.png",
           "routing/consistency.png"]


def compare(*args, timeout=3000):
    cmd = [sys.executable, "-m", "mome.experiments.compare", "--config", str(REPO / "configs" / "compare_demo.yaml"),
           *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout + proc.stderr


def test_quick_comparison_end_to_end(tmp_path):
    out = tmp_path / "quick"
    log = compare("--quick", "--out", str(out))
    for name in OUTPUTS:
        assert (out / name).is_file(), f"{name} missing:\n{log[-3000:]}"
    doc = json.loads((out / "results.json").read_text())
    runs = {r["run_id"]: r for r in doc["runs"]}
    assert len(runs) == 11 and all(r["train"]["steps"] == 3 for r in runs.values())
    assert doc["extra_seeds"]["best"] in ("mtsk_ms", "mtsk_ss", "mtsk_mss")
    kinds = {(r["key"], r["kind"]) for r in doc["records"]}
    assert ("mome", "beam") in kinds and ("mome_asr", "noise") in kinds
    assert {r["snr"] for r in doc["judge"]} == {"clean", "5", "0", "-5"}
    assert {e["role"] for e in doc["routing"]} == {"trained", "initial", "ablation"}
    page = (out / "RESULTS.md").read_text()
    assert "Quick run" in page and "## The paper's claims, here" in page and "utt/s" in page
    assert (out / "work" / ".gitignore").read_text().strip().endswith("*")

    # a second call: every run is found trained, nothing is decoded again
    log2 = compare("--quick", "--out", str(out))
    assert log2.count("not retrained") == 11, log2[-3000:]
    assert "[train]" not in log2 and "decoding" not in log2 and "routing:" not in log2

    # the report alone, from results.json: the same tables, the figures and the page again
    tables = {n: (out / n).read_text() for n in ("table_clean.md", "table_noise.md")}
    for name in OUTPUTS:
        if name != "results.json":
            (out / name).unlink()
    shutil.rmtree(out / "work")  # nothing from the runs is needed
    compare("--out", str(out), "--report-only")
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert {n: (out / n).read_text() for n in tables} == tables
