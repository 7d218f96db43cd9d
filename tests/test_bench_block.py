"""bench_block's paired comparison on the bundled masked-diffusion model: at window 1 both rules are
the plain sampler bit for bit, so the paired per-sample difference must be exactly 0 (the runs use
the same per-sample generators); at a window they differ, and the table renders."""

from specdiff.workbench.bench_block import bundled_table, run_bundled


def test_bench_pairs_the_rules_by_seed():
    result = run_bundled(samples=3, windows=[1, 4], masked=True, text=False, steps={"masked": [8]}, latency=1)
    rows = {(r["drafter"], r["window"], r["verify"]): r for r in result["rows"]}
    assert len(rows) == 8
    for drafter in ("frozen", "distilled"):
        step, block = rows[(drafter, 1, "step")], rows[(drafter, 1, "block")]
        assert block["paired_gain"] == 0 and block["paired_gain_se"] == 0
        assert step["calls_per_sample"] == block["calls_per_sample"] == 8
        assert rows[(drafter, 4, "step")]["calls_per_sample"] < 8  # the window speculates
    assert bundled_table(result).count("\n") == 2 + len(result["rows"]) - 1
