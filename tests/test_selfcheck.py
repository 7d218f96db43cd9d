"""``specdiff selfcheck --quick`` on the CPU: every check runs and passes; a failure exits non-zero."""

import pytest

from specdiff import cli, selfcheck


def test_selfcheck_quick_on_the_cpu_passes_every_check(capsys):
    assert cli.main(["selfcheck", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("window=1 == plain loop (gaussian, float32)", "window=1 == plain loop (categorical, bfloat16)",
                 "same law as the plain loop", "host syncs per round (simulated cuda)", "latency curve",
                 "timing table"):
        assert f"ok    {name}" in out, out
    assert 'n/a   max_rows="auto" within memory' in out  # CUDA only
    assert "FAIL" not in out and out.rstrip().endswith("all checks passed")
    assert "32: " in out and "speculative       8" in out  # the latency curve and the timing table


def test_a_failed_check_exits_non_zero(monkeypatch, capsys):
    def failing(device, quick):
        return selfcheck.SelfCheckResult(str(device), [selfcheck.Check("same law as the plain loop", "FAIL", "p = 0")])

    monkeypatch.setattr(selfcheck, "selfcheck", failing)
    assert cli.main(["selfcheck", "--device", "cpu"]) == 1
    assert "SOME CHECKS FAILED" in capsys.readouterr().out


def test_a_check_that_raises_fails_with_its_error():
    check = selfcheck._run("boom", lambda: 1 / 0)
    assert check.status == "FAIL" and "ZeroDivisionError" in check.detail


def test_an_unusable_device_is_a_clear_error(capsys):
    assert cli.main(["selfcheck", "--device", "nonsense"]) == 2
    assert "--device nonsense is not usable here" in capsys.readouterr().err


@pytest.mark.parametrize("device,half", [("cpu", "bfloat16"), ("cuda", "float16"), ("mps", "float16")])
def test_the_half_type_checked_per_device(device, half):
    import torch

    assert selfcheck.half_type(torch.device(device)) == getattr(torch, half)


def test_the_cuda_only_checks_run_on_the_simulated_cuda_device():
    """The CUDA branch of max_rows="auto" and the timing's synchronisation, on the simulated device
    (memory queries answer zeros there: this checks the code path, not the memory)."""
    import torch

    from specdiff.syncs import count_syncs

    with count_syncs(simulate="cuda"):
        device = torch.device("cuda")
        _, make = selfcheck._network(device, quick=True)
        check = selfcheck.check_max_rows(device, lambda batch: make(batch, steps=12))
        rows = selfcheck.timing(device, lambda batch: make(batch, steps=12))
    assert check.status == "ok", check.detail
    assert [r["sampler"] for r in rows] == ["plain", "speculative"] and rows[0]["calls"] == 12
