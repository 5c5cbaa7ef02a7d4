"""Training steps replayed as CUDA graphs (``cuda_graphs: true`` in the search and eval configs).

A DARTS step launches thousands of small kernels; captured once as a CUDA graph, a step is one launch from
the host. The step function runs uncaptured for a few warm-up calls (on a side stream, as capture needs:
optimiser state and cuDNN plans get allocated there), is then captured with static input buffers, and later
calls copy their batch into those buffers and replay the graph. Anything a step bakes in as a Python number
(the learning rate, drop-path probability) is part of the ``key``: a new key re-captures. A capture that
fails (a host sync inside the step, an op that cannot be captured) falls back to uncaptured steps with one
warning; on a device without CUDA the switch warns once and does nothing. Results equal the uncaptured
step's (the same kernels on the same inputs); measured figures: docs/performance.md.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, Sequence

import torch

Step = Callable[..., Sequence[torch.Tensor]]


class GraphedStep:
    """``step(*inputs) -> tensors``, captured as a CUDA graph after ``warmup`` calls when ``enabled`` on a
    CUDA device. The tensors returned by a replay are the graph's static outputs: read (or copy) them before
    the next call."""

    def __init__(self, step: Step, device: torch.device, enabled: bool = True, warmup: int = 3,
                 name: str = "step") -> None:
        self.step, self.warmup, self.name = step, warmup, name
        self.enabled = enabled and device.type == "cuda"
        if enabled and device.type != "cuda":
            warnings.warn(f"cuda_graphs: the {name} runs on {device.type}, not CUDA; running it uncaptured",
                          RuntimeWarning, stacklevel=2)
        self.key: Hashable = None
        self.calls = 0
        self.graph: Any = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_outputs: Sequence[torch.Tensor] = ()

    def __call__(self, key: Hashable, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        if not self.enabled:
            return self.step(*inputs)
        if key != self.key:  # e.g. a new epoch's learning rate: warm up and capture again
            self.key, self.calls, self.graph = key, 0, None
        if self.graph is None:
            if self.calls < self.warmup:
                self.calls += 1
                return self._warm(inputs)
            try:
                self._capture(inputs)
            except Exception as error:  # noqa: BLE001 - any capture failure means: run uncaptured
                self.enabled, self.graph = False, None
                warnings.warn(f"cuda_graphs: capturing the {self.name} failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); running it uncaptured",
                              RuntimeWarning, stacklevel=2)
                return self.step(*inputs)
        for static, value in zip(self.static_inputs, inputs):
            static.copy_(value)
        self._replay()
        return self.static_outputs

    def _warm(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable optimiser warns when it steps uncaptured: here it is warming up for the capture
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            out = self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, inputs: Sequence[torch.Tensor]) -> None:
        self.static_inputs = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_outputs = self.step(*self.static_inputs)
        self.graph = graph

    def _replay(self) -> None:
        self.graph.replay()
