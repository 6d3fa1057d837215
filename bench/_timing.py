"""Timing shared by the benchmarks."""
import time

import torch


def timed_interleaved(fns, device, reps):
    """Best time of each function, measured round-robin so that load changes on a shared machine hit all alike."""
    for fn in fns.values():
        fn()                                            # warm-up (allocations, kernels, text-feature cache)
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for label, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[label] = min(best[label], time.perf_counter() - t0)
    return best
