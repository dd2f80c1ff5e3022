"""`python train.py --model all`: the whole pipeline on the smoke preset, end to end (results.md = metrics.json
= what it prints), checkpoint reuse, and the README figures."""
import json

import pytest

import sample


def test_results_markdown_formats_every_row_and_skips_missing_runs():
    res = {"vqvae": {"GT": {"mse/all": 0.0, "fd/all": 1e-20}, "model": {"mse/all": 0.012345, "fd/all": float("nan")}}}
    md = sample.results_markdown(res, "x86_64 CPU, 2 cores", {"vqvae": {"train": 1.25, "evaluate": 0.5}}, "smoke")
    assert "| vqvae | GT | 0 | 1.00e-20 |" in md          # exact zero stays 0; tiny values in scientific form
    assert "| vqvae | model | 0.01235 | – |" in md        # 4 significant digits; NaN shown as a dash
    assert "vqvae 1.2 + 0.5; total 1.8." in md and "Listening heads" not in md   # tables without any run are left out


def test_train_all_smoke_end_to_end(tiny_world, tmp_path, capsys):
    runs = tmp_path / "runs"
    results = sample.run_all(["--preset", "smoke", "--data", str(tiny_world), "--runs", str(runs)])
    printed = capsys.readouterr().out
    md = (runs / "results.md").read_text()
    assert md.strip() in printed                          # the file is what the command printed
    assert set(results) == {run for run, _, _ in sample.PIPELINE}
    for run, rows in results.items():
        assert json.loads((runs / run / "metrics.json").read_text()) == rows
        assert (runs / run / "ckpt.pt").exists()
    # every number of every table row is in results.md exactly as the metrics.json of its run says
    for _, names, cols, _ in sample.TABLES:
        for run in names:
            for row, vals in results[run].items():
                line = f"| {run} | {row} | " + " | ".join(sample._fmt(vals.get(c)) for c in cols) + " |"
                assert line in md, line
    assert results["lm_listener"]["GT"]["mse/all"] == 0.0
    assert results["diff_transformer"]["GT"]["lve"] == 0.0
    for f in ("listeners.png", "reactions.png", "talking_face.png"):
        assert (runs / "figures" / f).stat().st_size > 1000
    # a second call reuses the checkpoints and re-evaluates to the same numbers
    again = sample.run_all(["--preset", "smoke", "--data", str(tiny_world), "--runs", str(runs), "--only", "vqvae"])
    assert "vqvae: reusing" in capsys.readouterr().out
    assert again == results                               # --only: the other runs come from their metrics.json
    assert (runs / "results.md").read_text().count("| lm_listener | model |") == 1


def test_only_rejects_unknown_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.run_all(["--only", "vqvae,gan", "--runs", str(tmp_path)])
    assert "unknown run(s) ['gan']" in capsys.readouterr().err


def test_readme_results_section_has_the_pipeline_layout():
    """The README's results are runs/results.md pasted in: each table has the header results_markdown writes, and
    every row names a pipeline run (so a hand-edited or stale-format table shows up here)."""
    readme = (sample.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Results on the synthetic world", 1)[1].split("\n## ", 1)[0]
    section = section.split("The papers' own numbers", 1)[0]         # the reference table is not generated
    assert "Preset `default`. Hardware: " in section
    runs = {run for run, _, _ in sample.PIPELINE}
    for title, names, cols, _ in sample.TABLES:
        assert f"### {title}" in section, title
        assert "| run | row | " + " | ".join(cols) + " |" in section, title
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| run |")]
    assert rows and all(ln.split(" | ")[0][2:] in runs for ln in rows)
    for run in runs:
        assert f"| {run} | model |" in section, run
