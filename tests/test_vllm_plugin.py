"""The plugin's read-ahead (engines/vllm_plugin.read_ahead, issue 27): tensors come in the plan's order, loaded on a
thread, never more than the byte budget ahead of the consumer; errors reach the consumer; an early stop stops it.
(The plugin inside a real vLLM: tests/vllm/test_plugin_vllm.py.)"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from rlexport.engines.vllm_plugin import read_ahead
from rlexport.tensors import TensorRef


class Live:
    """Counts the bytes loaded and not yet handed back (the consumer's `del` is the hand-back)."""

    def __init__(self):
        self.lock, self.held, self.peak, self.loaded, self.threads = threading.Lock(), 0, 0, [], set()

    def ref(self, name: str, rows: int, *, fail: bool = False) -> TensorRef:
        def load():
            if fail:
                raise OSError(f"cannot read {name}")
            time.sleep(0.002)
            with self.lock:
                self.held += rows * 1024 * 4
                self.peak = max(self.peak, self.held)
                self.loaded.append(name)
                self.threads.add(threading.current_thread().name)
            return torch.full((rows, 1024), float(len(name)))
        return TensorRef(name, torch.float32, (rows, 1024), load, "test")

    def give_back(self, t: torch.Tensor) -> None:
        with self.lock:
            self.held -= t.nbytes


def test_order_and_bounded_bytes_ahead():
    live = Live()
    refs = [live.ref(f"t{i}", 64 if i != 5 else 1024) for i in range(12)]  # 256 KiB each, one of 4 MiB
    budget = 3 * 64 * 1024 * 4
    names = []
    for name, t in read_ahead(refs, budget):
        names.append(name)
        time.sleep(0.005)  # vLLM placing the tensor: the thread reads ahead meanwhile
        assert t.shape == (64 if name != "t5" else 1024, 1024)
        live.give_back(t)
        del t
    assert names == [r.name for r in refs]
    assert live.threads == {"rlexport-read-ahead"}  # loaded off the consumer's thread
    # the budget plus the one tensor the consumer holds; the 4 MiB tensor alone (nothing else held with it)
    assert live.peak <= max(budget + 64 * 1024 * 4, 1024 * 1024 * 4)
    assert live.peak > 64 * 1024 * 4  # it did read ahead


def test_an_error_reaches_the_consumer_in_order():
    live = Live()
    refs = [live.ref("a", 4), live.ref("b", 4, fail=True), live.ref("c", 4)]
    got = []
    with pytest.raises(OSError, match="cannot read b"):
        for name, _ in read_ahead(refs, 1 << 20):
            got.append(name)
    assert got == ["a"] and "c" not in live.loaded


def test_an_early_stop_stops_the_thread():
    live = Live()
    refs = [live.ref(f"t{i}", 64) for i in range(50)]
    it = read_ahead(refs, 64 * 1024 * 4)
    next(it)
    it.close()
    time.sleep(0.2)
    assert not any(t.name == "rlexport-read-ahead" for t in threading.enumerate())
    assert len(live.loaded) < 50
