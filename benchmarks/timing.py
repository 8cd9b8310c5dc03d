"""Timing shared by the benchmarks: the device's copy bandwidth, and launches replayed as
one CUDA graph.

A floor taken from a constant holds for one GPU; the benchmarks measure the GPU they run on
(an H100 copies at about 3.05 TB/s, an H200 at about 4.3) and divide by what they measured.
"""

from __future__ import annotations

import statistics

import torch

H200_COPY = 4.3e12  # bytes/s, the H200's measured copy bandwidth: the CPU runs' stand-in


def copy_bandwidth(device=None, gib: float = 2.0, reps: int = 20) -> float:
    """Bytes per second of a device-to-device copy of `gib` GiB (read + write counted), the
    median of `reps` copies timed by CUDA events; H200_COPY where there is no GPU."""
    if not torch.cuda.is_available():
        return H200_COPY
    device = device or torch.device("cuda")
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / statistics.median(times)


def graph_replay_ms(run, reps: int) -> float:
    """Median ms of run() (kernel launches, no host sync) captured once as a CUDA graph and
    replayed `reps` times between CUDA events."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)
