"""Table / CSV layout (rows = method / scale, columns = SNR) and the PNG plots."""
import csv

import pytest

from mome.evaluation import plots, tables


def _rec(method, scale, snr, wer, judge=False):
    return dict(method=method, scale=scale, snr=snr, wer=wer, cer=wer / 2, judge=judge,
                task=scale.split(":")[0] if ":" in scale else "asr")


def test_metric_table_layout(tmp_path):
    recs = [
        _rec("mome", "avsr:4x2", "0", 0.30),
        _rec("mome", "avsr:4x2", "clean", 0.10),
        _rec("mome", "avsr:4x2", "-5", 0.50),
        _rec("mome", "asr:16", "clean", 0.20),
        _rec("whisper-tiny.en (judge)", "full", "clean", 0.05, judge=True),
        _rec("whisper-tiny.en (judge)", "full", "-5", 0.90, judge=True),
        _rec("llama_avsr", "avsr:4x2", "clean", 0.123),
    ]
    header, rows = tables.metric_table(recs, "wer")
    assert header == ["Method", "Scale", "clean", "0 dB", "-5 dB"]
    assert rows == [
        ["mome", "avsr:4x2", "10.0", "30.0", "50.0"],
        ["mome", "asr:16", "20.0", "–", "–"],
        ["llama_avsr", "avsr:4x2", "12.3", "–", "–"],
        ["whisper-tiny.en (judge)", "full", "5.0", "–", "90.0"],
    ]
    md = tables.to_markdown(header, rows).splitlines()
    assert md[0] == "| Method | Scale | clean | 0 dB | -5 dB |"
    assert md[1] == "|---|---|---|---|---|"
    assert md[2] == "| mome | avsr:4x2 | 10.0 | 30.0 | 50.0 |"
    paths = tables.write_tables(tmp_path, recs, cost=[], title="t")
    with open(paths["wer_csv"]) as f:
        assert list(csv.reader(f)) == [header] + rows
    with open(paths["cer_csv"]) as f:
        assert list(csv.reader(f))[1] == ["mome", "avsr:4x2", "5.0", "15.0", "25.0"]
    assert tables.scale_table(recs, "clean") == (
        ["Method", "avsr:4x2", "asr:16"],
        [["mome", "10.0", "20.0"], ["llama_avsr", "12.3", "–"]],
    )
    text = paths["markdown"].read_text()
    assert "## WER (%) at clean, rows = method, columns = scale" in text and "| mome | 10.0 | 20.0 |" in text
    assert "## WER (%)" in text and "## CER (%)" in text and "| mome | asr:16 | 20.0 | – | – |" in text


def test_snr_order_and_labels():
    assert sorted(["-5", "2.5", "clean", "5", "0", "-2.5"], key=tables.snr_sort_key) == [
        "clean", "5", "2.5", "0", "-2.5", "-5"]
    assert [tables.snr_label(s) for s in ("clean", "5.0", 5, "-2.50", "inf")] == ["clean", "5", "5", "-2.5", "clean"]


def _full_records():
    recs = []
    for method, base in (("mome", 0.1), ("llama_avsr", 0.2)):
        for scale, task, a, v in (("avsr:4x2", "avsr", 4, 2), ("asr:16", "asr", 16, None), ("vsr:5", "vsr", None, 5)):
            tps = (50 / a if a else 0) + (25 / v if v else 0)
            for snr, add in (("clean", 0.0), ("0", 0.2), ("-5", 0.4)):
                recs.append(dict(method=method, scale=scale, task=task, snr=snr, wer=base + add, cer=base / 2,
                                 judge=False, tokens_per_second=tps))
    recs += [dict(method="whisper (judge)", scale="full", task="asr", snr=s, wer=w, cer=w, judge=True,
                  tokens_per_second=None) for s, w in (("clean", 0.05), ("0", 0.3), ("-5", 0.8))]
    return recs


def test_plots_write_pngs(tmp_path):
    recs = _full_records()
    for fn, name in ((plots.plot_wer_vs_snr, "snr.png"), (plots.plot_wer_vs_tokens, "tok.png")):
        p = fn(recs, tmp_path / name, title="t")
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="no model records"):
        plots.plot_wer_vs_snr([r for r in recs if r["judge"]], tmp_path / "x.png")
