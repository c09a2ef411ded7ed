"""Requests that arrive while the model is busy, predicted together (see PredictionBatcher).

SageMaker's model server serves concurrent requests with several worker processes; here one process serves them
by batching, one batch at a time.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

MAX_BATCH_SIZE = 16  # inputs predicted together at most


class _Waiting:
    """An input waiting for its prediction."""

    def __init__(self, data):
        self.data = data
        self.prediction = None
        self.error: Exception | None = None
        self.done = threading.Event()


class PredictionBatcher:
    """Runs a model's predict_fn on batches: every input waiting when the model is free, stacked.

    It takes the inputs that input_fn answers as a torch tensor holding a batch of one (the PyTorch container's
    convention): predict_fn gets those waiting concatenated along the first dimension, and each input gets back
    its row, a batch of one, as predict_fn would answer for it alone. No input waits for others to come: a lone
    request is predicted alone, on its own thread (a hand-off to the batching thread costs a millisecond or two
    here), and the requests that arrive while the model is busy form the next batch. Batching stops
    for good, each input then predicted alone, once predict_fn is seen not to batch: its first batch's answer is
    checked against those for each input alone, and a batch it fails on while each input alone succeeds counts.
    """

    def __init__(self, predict_fn: Callable, model, name: str):
        self._predict_fn = predict_fn
        self._model = model
        self._name = name
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._model_lock = threading.Lock()  # held while predict_fn runs: one batch at a time
        self._batching = True
        self._checked = False  # a batch's answer was found equal to the answers for its inputs alone
        self._thread = threading.Thread(target=self._run, name=f"predict-{name}", daemon=True)
        self._thread.start()

    @staticmethod
    def takes(data) -> bool:
        torch = sys.modules.get("torch")  # a model that answers tensors has imported it
        return torch is not None and isinstance(data, torch.Tensor) and data.dim() > 0 and data.shape[0] == 1

    def predict(self, data):
        """predict_fn's answer for `data`; raises what predict_fn raised for it."""
        waiting = _Waiting(data)
        if self._model_lock.acquire(blocking=False):
            try:
                self._predict_group([waiting])
            finally:
                self._model_lock.release()
        else:
            self._queue.put(waiting)
            waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.prediction

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            with self._model_lock:
                groups = {}  # inputs of one shape and type are stacked together
                for waiting in [first, *self._waiting(MAX_BATCH_SIZE - 1)]:
                    data = waiting.data
                    groups.setdefault((data.shape, data.dtype, data.device), []).append(waiting)
                for group in groups.values():
                    self._predict_group(group)

    def _predict_group(self, group: list[_Waiting]) -> None:
        try:
            self._predict(group)
        except BaseException as error:  # even predict_fn calling sys.exit() must fail only its own requests
            failure = error if isinstance(error, Exception) else RuntimeError(f"predict_fn raised {error!r}")
            for waiting in group:
                if waiting.prediction is None and waiting.error is None:
                    waiting.error = failure
        finally:
            for waiting in group:
                waiting.done.set()

    def _waiting(self, most: int) -> list[_Waiting]:
        taken = []
        while len(taken) < most:
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                break
            if waiting is None:  # closing: for the loop to end after this batch
                self._queue.put(None)
                break
            taken.append(waiting)
        return taken

    def _predict(self, group: list[_Waiting]) -> None:
        if not self._batching or len(group) == 1:
            for waiting in group:
                self._predict_alone(waiting)
            return
        torch = sys.modules["torch"]
        try:
            predictions = self._predict_fn(torch.cat([waiting.data for waiting in group]), self._model)
        except Exception:
            predictions = None  # predicting each input alone tells whether an input or the batching failed
        rows = isinstance(predictions, torch.Tensor) and predictions.dim() > 0 and predictions.shape[0] == len(group)
        if rows and self._checked:
            for number, waiting in enumerate(group):
                waiting.prediction = predictions[number : number + 1]
            return
        for waiting in group:
            self._predict_alone(waiting)
        if rows:
            self._checked = self._batching = all(
                _same(waiting.prediction, predictions[number : number + 1]) for number, waiting in enumerate(group)
            )
        elif predictions is not None or all(waiting.error is None for waiting in group):
            self._batching = False
        if not self._batching:
            print(
                f"local.endpoint: {self._name}: predict_fn does not answer a batch as its inputs one by one: "
                "each input is predicted alone",
                file=sys.stderr,
                flush=True,
            )

    def _predict_alone(self, waiting: _Waiting) -> None:
        try:
            waiting.prediction = self._predict_fn(waiting.data, self._model)
        except Exception as error:
            waiting.error = error


def _same(alone, row) -> bool:
    torch = sys.modules["torch"]
    try:
        return (
            isinstance(alone, torch.Tensor)
            and alone.shape == row.shape
            and torch.allclose(alone, row, rtol=1e-4, atol=1e-6)
        )
    except RuntimeError:
        return False
