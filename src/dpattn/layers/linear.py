"""The one matmul every projection goes through: y = x @ weight.T (+ bias).

On CPU in fp32 with few rows (decode batches) it computes weight @ x.T instead: BLAS then streams the
large weight matrix as it is stored rather than packing it per call, 1.3-2x faster for the
projections and the LM head at 4-64 rows (measured on 2 cores). The dot products are the same;
only the kernel differs. Very tall weights (the LM head) go in row blocks that stay in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SKINNY_ROWS = 128  # above this F.linear's packed GEMM is as fast or faster (measured)
_BLOCK_ROWS = 4096  # weight rows per block for tall weights (vocab-sized)
_TALL = 8 * _BLOCK_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32  # bf16 on CPUs without bf16 FMA: no gain, measured
        or x.dim() != 2
        or not 1 < x.shape[0] <= SKINNY_ROWS
    ):
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    if n < _TALL:
        out = torch.mm(weight, x.t()).t().contiguous()
    else:  # transpose block by block while the block is in cache
        out = x.new_empty((x.shape[0], n))
        block = x.new_empty((_BLOCK_ROWS, x.shape[0]))
        for lo in range(0, n, _BLOCK_ROWS):
            rows = min(_BLOCK_ROWS, n - lo)
            torch.mm(weight[lo : lo + rows], x.t(), out=block[:rows])
            out[:, lo : lo + rows].copy_(block[:rows].t())
    return out if bias is None else out + bias
