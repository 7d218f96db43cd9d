"""Where benchmarks write: a checkout's saved results and docs, or ./outputs from an installed wheel
(issue 20: a benchmark run from a wheel overwrote the shipped results in site-packages)."""

from pathlib import Path

import specdiff.paths as paths

ROOT = Path(__file__).resolve().parents[1]


def test_in_a_checkout_benchmarks_write_the_saved_results_and_their_pages():
    assert paths.checkout() == ROOT
    assert paths.results("defaults.json") == ROOT / "assets" / "bench" / "defaults.json"
    assert paths.docs_page("quality.md") == ROOT / "docs" / "quality.md"


def test_from_an_installed_wheel_benchmarks_write_under_outputs_never_into_the_package(monkeypatch, tmp_path):
    package = tmp_path / "site-packages" / "specdiff"
    (package / "assets").mkdir(parents=True)
    monkeypatch.setattr(paths, "asset", lambda *parts: (package / "assets").joinpath(*parts))
    assert paths.checkout() is None
    assert paths.results("defaults.json") == Path("outputs") / "bench" / "defaults.json"
    assert paths.docs_page("quality.md") == Path("outputs") / "docs" / "quality.md"


def test_python_m_bench_writes_where_paths_results_says_and_report_reads_the_shipped_results(monkeypatch, tmp_path):
    """``python -m specdiff.workbench.bench`` (its own docstring's usage) defaulted ``--out`` to the
    package's assets: from a wheel it wrote into site-packages. Now it writes to ``paths.results()``,
    and ``report --write PATH`` creates the page's folder."""
    import specdiff.workbench.bench as bench

    seen = []
    monkeypatch.setattr(bench, "results", lambda *parts: tmp_path / "outputs" / "bench")
    monkeypatch.setattr(bench, "bench_analytic", lambda out, quick: seen.append(out))
    assert bench.main(["analytic", "--quick", "--threads", "0"]) == 0
    assert seen == [tmp_path / "outputs" / "bench"]
    page = tmp_path / "outputs" / "docs" / "benchmarks.md"
    assert bench.main(["report", "--write", str(page), "--threads", "0"]) == 0
    assert page.read_text().startswith("#")
