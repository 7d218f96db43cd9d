import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests run tiny tensors: one thread avoids thread start-up and contention costs on small CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_latency_cache(tmp_path_factory):
    """The automatic window's calibration (latency curve, dry-run overhead) goes to a folder of the
    test session, never the user's ``~/.cache/specdiff`` (test timings would steer their runs)."""
    import os

    import specdiff.window as window

    saved, memory = os.environ.get("SPECDIFF_CACHE_DIR"), dict(window._MEMORY_CACHE)
    os.environ["SPECDIFF_CACHE_DIR"] = str(tmp_path_factory.mktemp("specdiff-cache"))
    window._MEMORY_CACHE.clear()
    yield
    if saved is None:
        os.environ.pop("SPECDIFF_CACHE_DIR", None)
    else:
        os.environ["SPECDIFF_CACHE_DIR"] = saved
    window._MEMORY_CACHE.clear()
    window._MEMORY_CACHE.update(memory)


@pytest.fixture(scope="module")
def mixture_reference():
    """(chain, x_init, plain samples): 1500 draws of a 100-step 2-d mixture DDPM, for two-sample law tests."""
    from specdiff import sample_baseline
    from specdiff.testing import GaussianMixtureDDPM

    chain = GaussianMixtureDDPM.random(dim=2, components=4, num_steps=100, seed=1)
    x = chain.sample_prior(1500, torch.Generator().manual_seed(11))
    return chain, x, sample_baseline(chain, x, torch.Generator().manual_seed(12))
