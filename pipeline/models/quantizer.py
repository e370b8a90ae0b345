"""Vector quantizer for VQ autoencoders, a drop-in for diffusers' `VectorQuantizer` inside `VQModel`.

Keeps diffusers' parameter name (`embedding.weight`) so trained weights load into a plain `VQModel`, and adds what
training needs: the straight-through estimator, commitment weight beta (van den Oord et al. 2017), codebook learned
by loss or by EMA of assignments (decay 0.99, Laplace smoothing; Razavi et al. 2019), optional l2-normalised
(cosine) codes, restart of dead codes from recent encoder outputs, and usage / perplexity statistics.

Under torch.distributed the EMA statistics and restarts are all-reduced / broadcast, so every rank keeps the same
codebook (no accelerate import: this is plain torch.distributed, like SyncBatchNorm).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code-usage distribution given by assignment counts: 1 when one code takes everything,
    the number of codes when use is uniform."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p + 1e-12)).sum())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        update: str = "ema",
        ema_decay: float = 0.99,
        cosine: bool = False,
        restart_dead: bool = True,
        dead_after: int = 100,
        usage_window: int = 100,
        eps: float = 1e-5,
    ):
        super().__init__()
        if update not in ("ema", "loss"):
            raise ValueError(f"update must be 'ema' or 'loss', got {update!r}")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.update, self.ema_decay, self.cosine = update, ema_decay, cosine
        self.restart_dead, self.dead_after, self.usage_window, self.eps = restart_dead, dead_after, usage_window, eps
        self.embedding = nn.Embedding(num_codes, dim)
        self.embedding.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if update == "ema":
            self.embedding.weight.requires_grad_(False)
        # persistent: a resumed run continues the same statistics. cluster_size starts at 1 with embed_sum equal to
        # the codes, so an unused code decays in both and stays where it is instead of blowing up (sum / ~0)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", self.embedding.weight.data.clone())
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    # diffusers-compatible names
    @property
    def n_e(self) -> int:
        return self.num_codes

    @property
    def vq_embed_dim(self) -> int:
        return self.dim

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.cosine else w

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest code index for each row of flat [N, dim] (squared Euclidean; cosine when normalised)."""
        e = self.codebook()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def flatten(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, dim, H, W] -> rows [B*H*W, dim] as they are compared with the codebook (unit length when cosine)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        return F.normalize(flat, dim=1) if self.cosine else flat

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """The code index [B, H, W] of each position (what forward() returns, without the straight-through part)."""
        return self.assign(self.flatten(z)).view(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: torch.Tensor):
        """z [B, dim, H, W] -> (z_q with straight-through gradient, loss, (perplexity, None, indices)).

        The loss is the codebook + beta * commitment term (EMA mode: beta * commitment only), a scalar."""
        b, _, h, w = z.shape
        flat = self.flatten(z)
        with torch.no_grad():
            idx = self.assign(flat)
        q = self.codebook()[idx]
        commitment = F.mse_loss(flat, q.detach())
        if self.update == "loss":
            loss = F.mse_loss(q, flat.detach()) + self.beta * commitment
        else:
            loss = self.beta * commitment
        if self.training:
            self._update_statistics(flat.detach(), idx)
        q_st = flat + (q - flat).detach()  # straight-through: the decoder's gradient reaches the encoder
        z_q = q_st.view(b, h, w, self.dim).permute(0, 3, 1, 2).to(z.dtype).contiguous()  # as diffusers: same numerics
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        return z_q, loss, (perplexity(counts), None, idx.view(b, h, w))

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        self.steps += 1
        onehot_counts = torch.bincount(idx, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device, dtype=flat.dtype).index_add_(0, idx, flat)
        if _distributed():
            dist.all_reduce(onehot_counts)
            dist.all_reduce(sums)
        self.last_used[onehot_counts > 0] = self.steps
        if self.update == "ema":
            d = self.ema_decay
            self.cluster_size.mul_(d).add_(onehot_counts, alpha=1 - d)
            self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
            self.embedding.weight.data.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_dead:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = (self.steps - self.last_used) >= self.dead_after
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # replacements: random encoder outputs of this step, chosen on rank 0 and broadcast so ranks agree
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = flat[pick]
        if _distributed():
            dist.broadcast(new, 0)
        self.embedding.weight.data[dead] = new.to(self.embedding.weight.dtype)
        self.embed_sum[dead] = new
        self.cluster_size[dead] = 1.0
        self.last_used[dead] = self.steps
        self.restarts += n_dead

    def usage(self) -> torch.Tensor:
        """Fraction of codes assigned at least once in the last `usage_window` steps (a tensor, no sync)."""
        return ((self.steps - self.last_used) < self.usage_window).float().mean()

    def get_codebook_entry(self, indices: torch.LongTensor, shape: tuple[int, ...]) -> torch.Tensor:
        z_q = self.codebook()[indices.reshape(-1)]
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q

