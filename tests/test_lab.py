"""normzoo lab: every experiment at a tiny size, the CLI, resume, corrupt files, pending experiments.

Verdicts are not asserted (tiny runs prove nothing scientifically); what is checked is that each experiment
produces its numbers, verdict and figure, and that the machinery around them behaves.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest

from normzoo.lab import ORDER, Result, run_experiment
from normzoo.lab import cli, experiments, runner
from normzoo.lab.runner import VERDICTS, CorruptResults, Progress, load_results

TINY = 0.04
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    """Every experiment, quick and tiny, through the CLI into one folder (run once for the module)."""
    out = tmp_path_factory.mktemp("lab")
    code = cli.main(["run", "all", "--out", str(out), "--scale", str(TINY), "--workers", "1", "--quiet"])
    return out, code


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["experiments"]


def test_all_experiments_run_and_report(tiny_lab):
    out, code = tiny_lab
    assert code == 0
    results = _results(out)
    assert list(results) == ORDER
    html = (out / "index.html").read_text()
    for name, r in results.items():
        assert r["verdict"] in VERDICTS, name
        assert r["verdict"] != "error", f"{name} failed:\n{r['error']}"
        assert r["finding"] and r["criterion"] and r["reason"], name
        assert r["config"] == {"quick": True, "seed": 0, "scale": TINY}
        assert f'id="{name}"' in html
        if r["verdict"] == "pending":
            assert r["missing"] and r["figure"] is None
            continue
        assert r["numbers"]["summary"], name
        json.dumps(r["numbers"], allow_nan=False)  # strict JSON: no NaN/inf
        fig = out / r["figure"]
        assert r["figure"] == f"figures/{name}.png"
        assert fig.read_bytes()[:8] == PNG and fig.stat().st_size > 5000
        assert f'src="figures/{name}.png"' in html  # relative: opens without a server


def test_report_rebuild(tiny_lab, tmp_path, capsys):
    out, _ = tiny_lab
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text((out / "results.json").read_text())
    assert cli.main(["report", str(copy)]) == 0
    html = (copy / "index.html").read_text()
    for name, r in _results(out).items():
        assert f'id="{name}"' in html
        if r["figure"]:
            assert (copy / r["figure"]).read_bytes()[:8] == PNG
    assert "normzoo lab" in html and "results.json" in html


def test_report_refuses_missing_and_corrupt(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "no results" in capsys.readouterr().err
    bad = tmp_path / "results.json"
    bad.write_text('{"format": "normzoo-lab/1", "experiments": {')
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert bad.exists()  # the report command never moves or rewrites results


def test_python_api_returns_result(tmp_path):
    r = run_experiment("saturation", quick=True, seed=3, scale=TINY)
    assert isinstance(r, Result) and r.name == "saturation" and r.verdict in VERDICTS
    assert r.config == {"quick": True, "seed": 3, "scale": TINY}
    assert "runs" in r.numbers and r.figure is None  # no folder given: nothing written
    r2 = run_experiment("saturation", quick=True, seed=3, scale=TINY, out=tmp_path)
    assert r2.numbers == r.numbers  # deterministic for a seed
    assert (tmp_path / "figures" / "saturation.png").exists() and (tmp_path / "index.html").exists()
    assert _results(tmp_path)["saturation"]["numbers"] == r.numbers


def test_resume_skips_finished(tmp_path, capsys):
    args = ["run", "saturation", "learning_rate", "--out", str(tmp_path), "--scale", str(TINY), "--workers", "1"]
    assert cli.main(args[:2] + args[3:]) == 0
    first = _results(tmp_path)["saturation"]
    assert list(_results(tmp_path)) == ["saturation"]
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "saturation: finished before" in err and "learning_rate: finished before" not in err
    again = _results(tmp_path)
    assert again["saturation"] == first  # kept untouched
    assert set(again) == {"saturation", "learning_rate"}
    # other settings are not "finished": a different seed runs again
    assert cli.main(args + ["--seed", "1"]) == 0
    assert _results(tmp_path)["saturation"]["config"]["seed"] == 1


def test_interrupted_run_resumes(tmp_path, monkeypatch, capsys):
    real = experiments.get

    def interrupt(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "get", lambda n: dataclasses.replace(real(n), run=interrupt)
                        if n == "learning_rate" else real(n))
    args = ["run", "saturation", "learning_rate", "--out", str(tmp_path), "--scale", str(TINY), "--workers", "1"]
    assert cli.main(args) == 130  # Ctrl-C during the second experiment
    assert "interrupted during learning_rate" in capsys.readouterr().err
    assert list(_results(tmp_path)) == ["saturation"]  # the finished one was saved as it completed
    monkeypatch.setattr(experiments, "get", real)
    assert cli.main(args) == 0
    assert "saturation: finished before" in capsys.readouterr().err
    assert set(_results(tmp_path)) == {"saturation", "learning_rate"}


def test_corrupt_results_are_kept_aside(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text("{ this is not json")
    assert cli.main(["run", "saturation", "--out", str(tmp_path), "--scale", str(TINY), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    aside = tmp_path / "results.json.corrupt"
    assert aside.read_text() == "{ this is not json"
    assert "corrupt" in err and str(aside) in err
    assert "saturation" in _results(tmp_path)
    # a second bad file does not overwrite the first one kept aside
    bad.write_text('{"format": "something else"}')
    assert load_results(tmp_path, on_corrupt="move", warn=lambda m: None) == {}
    assert (tmp_path / "results.json.corrupt.1").read_text() == '{"format": "something else"}'
    assert aside.read_text() == "{ this is not json"
    bad.write_text('{"format": "normzoo-lab/1", "experiments": {"x": {"name": "x", "verdict": "great"}}}')
    with pytest.raises(CorruptResults, match="unknown verdict"):
        load_results(tmp_path)


def test_pending_when_layer_missing(tmp_path, monkeypatch):
    real = experiments.get

    def fake_get(name):
        exp = real(name)
        if name == "batch_renorm":
            return dataclasses.replace(exp, requires=("brn_not_written_yet",))
        return exp

    monkeypatch.setattr(experiments, "get", fake_get)
    results = runner.run_experiments(["batch_renorm"], tmp_path, scale=TINY)
    r = results["batch_renorm"]
    assert r.verdict == "pending" and r.missing == ["brn_not_written_yet"] and r.figure is None
    assert not r.numbers
    html = (tmp_path / "index.html").read_text()
    assert "Pending:" in html and "brn_not_written_yet" in html
    assert not (tmp_path / "figures" / "batch_renorm.png").exists()
    # pending is not "finished": once the layer exists the experiment runs (here: still missing, still pending)
    assert runner.run_experiments(["batch_renorm"], tmp_path, scale=TINY)["batch_renorm"].verdict == "pending"


def test_error_is_recorded_and_others_run(tmp_path, monkeypatch):
    real = experiments.get

    def boom(ctx):
        raise RuntimeError("deliberate failure")

    monkeypatch.setattr(experiments, "get", lambda n: dataclasses.replace(real(n), run=boom) if n == "saturation"
                        else real(n))
    results = runner.run_experiments(["saturation", "spectral_norm"], tmp_path, scale=TINY)
    assert results["saturation"].verdict == "error" and "deliberate failure" in results["saturation"].error
    assert results["spectral_norm"].verdict != "error"
    assert "The experiment failed" in (tmp_path / "index.html").read_text()


def test_cli_errors(capsys, tmp_path):
    assert cli.main(["run", "no_such_experiment", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["run", "saturation", "--scale", "3", "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("nope")


def test_list(capsys):
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ORDER:
        assert name in text
    assert "finding:" in text


def test_scale_from_environment(monkeypatch):
    monkeypatch.setenv("NORMZOO_LAB_SCALE", "0.5")
    assert runner.default_scale() == 0.5
    monkeypatch.setenv("NORMZOO_LAB_SCALE", "2")
    with pytest.raises(ValueError, match="NORMZOO_LAB_SCALE"):
        runner.default_scale()


def test_progress_line_on_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    p = Progress(stream=stream)
    p.start(1, 2, "saturation")
    p.update(3, 4, "runs")
    p.finish(Result(name="saturation", title="t", finding="f", criterion="c", source="s", verdict="reproduced",
                    reason="r", elapsed_s=1.0))
    text = stream.getvalue()
    assert "\r[1/2] saturation" in text and "3/4" in text and "reproduced" in text and text.endswith("\n")
    plain = io.StringIO()
    q = Progress(stream=plain)
    q.start(1, 2, "x")
    q.update(1, 2)
    assert plain.getvalue() == "[1/2] x ...\n"  # no carriage returns in a log file


def _close(a, b, rel=1e-4):
    """Equal structure, numbers equal to ``rel`` (a worker may pick normzoo's native or PyTorch kernels)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-9)
    return a == b


def test_workers_give_the_same_numbers():
    one = run_experiment("learning_rate", scale=TINY, workers=1)
    two = run_experiment("learning_rate", scale=TINY, workers=2)
    assert _close(one.numbers, two.numbers)
    assert not _close(one.numbers, run_experiment("learning_rate", scale=TINY, seed=1).numbers)


@pytest.mark.slow
def test_quick_lab_end_to_end(tmp_path):
    """The real ``normzoo lab`` (every quick experiment at full quick size); slow, skipped on CI."""
    assert cli.main(["--out", str(tmp_path), "--quiet"]) == 0
    results = _results(tmp_path)
    assert all(r["verdict"] != "error" for r in results.values())
