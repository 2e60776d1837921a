import gc
import ipaddress
import socket
import sys
from pathlib import Path

import pytest

# No cyclic garbage collection while torch, transformers and the test modules are imported (from here to
# pytest_collection_finish): each full collection walks every object imported so far, and importing and
# assertion-rewriting set off about twenty of them (1.3-1.8 s of each worker's collection here)
gc.disable()
# tests/ is importable: pytest puts the folder of a conftest.py outside any package on the import path
from tiny import make_tiny_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_finish(session):
    """Every test module is imported now (torch, transformers, peft, lite): move what exists to the
    collector's permanent generation, so that a full collection (HF Trainer and accelerate call
    ``gc.collect()`` at the end of every training run) walks only what the tests make since, not the
    libraries' millions of objects (0.3 s a call here, 3 or 4 calls a training run). Collection runs again
    from here (it was off while the modules were imported)."""
    gc.collect()
    gc.freeze()
    gc.enable()


def pytest_runtest_setup(item):
    """Before every test, the same for what the tests before it left alive or imported lazily (lite imports
    matplotlib, peft, datasets, scipy, nltk and sentence-transformers only when asked: 2,600 modules arrive
    after collection), once their garbage is collected: the collections a test sets off (HF Trainer's at the
    end of every run, 0.07-0.3 s each otherwise) walk only what that test makes. Measured here, the default
    suite with 2 workers: 89.0 s -> 71.9 s, user CPU 161 s -> 128 s; peak memory did not grow (objects
    frozen and freed later by reference counting are freed; only cycles among them would stay)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama folder (hidden 32) with a byte-level tokenizer and chat template."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """Tests never reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at its import: without this, a lookup it makes anyway (e.g.
    # transformers' search for an adapter_config.json beside a hub id) tries the network and sleeps through
    # its retries (23 s in one test here)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # ... nor anything else off this machine: a connection to any address but a loopback one fails at once
    # (the servers tests start listen on 127.0.0.1)
    real_connect = socket.socket.connect

    def connect(sock, address, *args):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not _loopback(host):
            raise OSError(f"tests never reach the network (a connection to {address} was tried)")
        return real_connect(sock, address, *args)

    monkeypatch.setattr(socket.socket, "connect", connect)
    # ... and never write into this machine's Hugging Face cache (lite places the embedded default there)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub-cache"))
    # ... nor into its datasets cache (lite train reads parquet/csv files and dataset folders through datasets)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models decode ~10x faster on one torch thread when the 2 cores are shared; restore afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is missing (the shared data folder sits beside the repository)")
    return SHARED_DATA
