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

    from specdiff import calibration

    saved, memory = os.environ.get("SPECDIFF_CACHE_DIR"), dict(calibration._MEMORY_CACHE)
    os.environ["SPECDIFF_CACHE_DIR"] = str(tmp_path_factory.mktemp("specdiff-cache"))
    calibration._MEMORY_CACHE.clear()
    yield
    if saved is None:
        os.environ.pop("SPECDIFF_CACHE_DIR", None)
    else:
        os.environ["SPECDIFF_CACHE_DIR"] = saved
    calibration._MEMORY_CACHE.clear()
    calibration._MEMORY_CACHE.update(memory)


@pytest.fixture(scope="module")
def mixture_reference():
    """(chain, x_init, plain samples): 1500 draws of a 100-step 2-d mixture DDPM, for two-sample law tests."""
    from specdiff import sample_baseline
    from specdiff.testing import GaussianMixtureDDPM

    chain = GaussianMixtureDDPM.random(dim=2, components=4, num_steps=100, seed=1)
    x = chain.sample_prior(1500, torch.Generator().manual_seed(11))
    return chain, x, sample_baseline(chain, x, torch.Generator().manual_seed(12))


@pytest.fixture
def resample_on_reject(monkeypatch):
    """A negative control: ``enable()`` breaks the Gaussian kernel's coupling the classic way (a
    rejected step gets a fresh, independent target draw instead of the reflected noise), which
    biases the sampler's law. A law test that passes for the sampler must fail under it at the
    same sample size, or it has no power. Wraps the kernel's ``correct`` so that only the
    returned state changes."""
    from specdiff.kernels import GaussianKernel

    original = GaussianKernel.correct

    def enable(seed: int = 0):
        noise = torch.Generator().manual_seed(seed)

        def correct(law_draft, law_target, y, z, *args, **kwargs):
            _, *rest = original(law_draft, law_target, y, z, *args, **kwargs)
            mean, std = law_target
            fresh = mean + std * torch.randn(y.shape, generator=noise, dtype=mean.dtype).to(mean.device)
            return (fresh.to(y.dtype), *rest)

        monkeypatch.setattr(GaussianKernel, "correct", staticmethod(correct))

    return enable


@pytest.fixture
def torchrun_generate(tmp_path):
    """``launch(processes, *args)``: ``specdiff generate --device cpu --no-progress *args`` under
    torchrun with that many CPU processes (gloo), started in the background; ``finish(run)`` waits
    and returns its stdout, failing the test on a non-zero exit."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(processes, *args):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "specdiff", "generate", "--device", "cpu", "--no-progress", *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=tmp_path)

    def finish(run):
        stdout, stderr = run.communicate(timeout=300)
        # A failing rank's own message comes first and torchrun's summary last: show both ends.
        assert run.returncode == 0, stderr if len(stderr) < 6000 else f"{stderr[:3000]}\n[...]\n{stderr[-3000:]}"
        return stdout

    return launch, finish
