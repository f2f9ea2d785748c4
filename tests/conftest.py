import os

import pytest
import torch

# Keep CPU tests quick and deterministic on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# CPU decode steps of packed layers default to a torch.compile'd loop (spectra.kernels.cpu_gemv), which compiles
# on first use and is exact only to fp32 summation order. The suite compares packed layers with their references
# bit for bit, so it runs the reference; tests/test_cpu_gemv.py turns the compiled path on and tests it.
os.environ.setdefault("SPECTRA_CPU_GEMV", "0")


@pytest.fixture
def scratch_kernel_table(monkeypatch, tmp_path):
    """The kernel-config tables re-read with an empty user cache in tmp_path, on a GPU named "Test GPU"."""
    from spectra.kernels import configs

    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path))
    monkeypatch.setattr(configs, "_table", None)
    monkeypatch.setattr(configs, "gpu_name", lambda device: "Test GPU")
    return tmp_path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
