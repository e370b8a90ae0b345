"""What the machine gives now: the throughput of a large matrix product (bf16 on a GPU, fp32 on a CPU), measured in a
second. A stated time means little without it: the same demo took 152 s on a host whose fp32 peak measured 0.35
TFLOP/s and 336 s on one measuring 0.10. And the mixed precision `auto` means on it (`resolve_mixed_precision`)."""

from __future__ import annotations

import statistics
import time


def matmul_peak(device=None, n: int | None = None, repeats: int = 7) -> tuple[float, str]:
    """(FLOP/s of an n x n x n matrix product, what was measured): the median of `repeats` after a warm-up."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(repeats + 2):
        sync()
        t = time.perf_counter()
        (a @ b).sum()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times), f"{'bf16' if cuda else 'fp32'} {n}^3 matmul"


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> bf16 on a GPU that has it, else 'no'."""
    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return choice if choice != "auto" else "bf16" if bf16 else "no"
