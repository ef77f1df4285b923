"""Process-wide caps on the maths libraries' thread pools (FAISS OpenMP, BLAS/OpenMP, torch).

Why one place: the server runs requests concurrently on worker threads and `recsvc-batch` runs
forked worker processes; in both, letting each FAISS search or matrix product also fan out over
every core oversubscribes the CPU (a 0.2 ms search turns into several ms of lock-step waiting),
and a forked child that enters an OpenMP region served by the parent's thread pool hangs.
Kept free of grpc so a batch worker can call it without importing the server stack.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def limit_compute_threads(threads: int) -> None:
    """Cap FAISS OpenMP, every BLAS/OpenMP runtime and torch intra-op threads at `threads`
    (0 or less: leave the libraries' defaults). Not restored: the cap is for the process's life."""
    if threads <= 0:
        return
    import torch
    from threadpoolctl import threadpool_limits

    limit_this_thread(threads)  # OpenMP (FAISS included): per calling thread
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")


def limit_this_thread(threads: int) -> None:
    """The OpenMP part of `limit_compute_threads` (FAISS and every OpenMP runtime), for the calling
    thread only: the initializer of thread pools that run FAISS.

    Why: OpenMP keeps its thread count per calling thread, and a thread Python starts later gets
    the runtime's default (every core), not the cap set on the main thread. The server's workers
    ran each FAISS search with all cores and burned the rest spin-waiting: on the 2-core box a
    lone 10k-item Recommend cost the server ~3-4 ms CPU while the same call in one thread took 1.5.
    """
    if threads <= 0:
        return
    from threadpoolctl import threadpool_limits

    from recsvc.retrieval import set_threads

    set_threads(threads)
    threadpool_limits(limits=threads, user_api="openmp")


def usable_cores() -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup v2 CPU quota (containers).

    Why not os.cpu_count(): in a container or under taskset it counts the host's CPUs, and more
    worker processes than usable CPUs only add memory and context switches.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)
