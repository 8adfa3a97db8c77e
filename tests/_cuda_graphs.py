"""The CUDA-graph check shared by the GPU tests: warm up on a side stream, capture one call, poison
what the capture returned, replay, and hand back the replayed and an eager result to compare."""

from __future__ import annotations

import torch


def replay_after_poisoning(step, warmup: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(replayed, eager) outputs of ``step()`` (a tuple of tensors): the capture's outputs are filled
    with NaN before the replay, so a replay that does not rewrite them fails the comparison."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    eager = [t.clone() for t in step()]
    for t in static:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return list(static), eager
