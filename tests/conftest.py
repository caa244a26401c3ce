from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from factories import FIXTURES, make_lora, make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the export self-check's facts cache (rlexport.checks.cache): per test session, never the user's
    monkeypatch.setenv("RLEXPORT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rlexport_cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and immune to a busy machine's thread contention. Module-scoped, so
    a module's own module-scoped fixtures (bases, exports) run with it too: `pytestmark = usefixtures(...)`."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_base) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora") / "lora", tiny_base)


def expected(case: str) -> dict:
    return json.loads((FIXTURES / case / "expected.json").read_text())
