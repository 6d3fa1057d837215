"""Timing and peak memory shared by the benchmarks."""
import contextlib
import gc
import resource
import sys
import time

import torch

# In a worker process whose peak RSS is measured, glibc must hand freed memory back to the kernel at once; otherwise
# a block's RSS growth hides in memory freed by an earlier block (the default mmap threshold grows with use).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


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


def _status_bytes(field):
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss():
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@contextlib.contextmanager
def measure(device):
    """Seconds and peak memory of the block, in the dict it yields, filled when the block ends:

      s            wall seconds (CUDA synchronised)
      cpu_s        CPU seconds of this process (all threads): on a shared CPU machine a steadier measure of the
                   work than wall time
      peak_GiB     CUDA: max_memory_allocated during the block (weights included, comparable with other runs in one
                   process); CPU: the process's peak RSS
      growth_GiB   the peak minus the memory in use when the block started (CUDA allocated / CPU resident): what the
                   block itself needed on top of the models
      exact        CPU only: False when the peak could not be reset (no /proc), so an earlier, higher peak may hide
                   the block's own
    """
    out = {}
    cuda = torch.device(device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        out["exact"] = _reset_peak_rss()
        start = _status_bytes("VmRSS") or _ru_maxrss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    yield out
    if cuda:
        torch.cuda.synchronize()
    out["s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (_status_bytes("VmHWM") if out["exact"] else None) or _ru_maxrss_bytes()
    out["peak_GiB"] = peak / 2**30
    out["growth_GiB"] = (peak - start) / 2**30
