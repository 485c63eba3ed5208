"""BackgroundRows: the input-reject pass drained on a thread beside the engine pass."""

import threading

import pytest

from datasets_pipeline.generate import BackgroundRows


class Rows:
    """BackgroundRows needs only ``iter_rows``; the Ray Dataset path is covered by the generation
    integration tests (input rejects counted in the manifest)."""

    def __init__(self, rows, fail_after=None, gate=None):
        self.rows, self.fail_after, self.gate = rows, fail_after, gate

    def iter_rows(self):
        for i, row in enumerate(self.rows):
            if self.gate is not None and i == 1:
                self.gate.wait(5)
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("read failed")
            yield row


def test_every_row_arrives_once_in_order_across_ready_and_rest():
    gate = threading.Event()
    bg = BackgroundRows(Rows([{"i": i} for i in range(5)], gate=gate))
    first = []
    while not first:
        first = bg.ready()
    gate.set()
    assert first + bg.rest() == [{"i": i} for i in range(5)]


def test_an_error_in_the_thread_reaches_the_caller_at_rest():
    bg = BackgroundRows(Rows([{"i": 0}, {"i": 1}], fail_after=1))
    with pytest.raises(RuntimeError, match="read failed"):
        bg.rest()
