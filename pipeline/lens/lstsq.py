"""The closed-form (least-squares) start of affine and linear translators: the statistics
of an affine fit streamed in float64, its ridge solution, and a translator set to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LenspipeError


class LeastSquaresAccumulator:
    """Streams the statistics of an affine fit Y ~ X A^T + c, in float64, O(N d^2).

    Keeps means and *centred* co-moments, merged per batch with Chan et al.'s update,
    instead of raw X^T X: residual streams have large mean components, and subtracting
    n * mean mean^T from raw sums at the end would cancel catastrophically.
    """

    def __init__(self, d_model: int, n_out: int | None = None, device: str | torch.device = "cpu"):
        d_out = n_out or d_model
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.mean_x, self.mean_y = torch.zeros(d_model, **kw), torch.zeros(d_out, **kw)  # (d_in,), (d_out,)
        self.cxx = torch.zeros(d_model, d_model, **kw)  # sum (x - mx)(x - mx)^T: (d_in, d_in)
        self.cxy = torch.zeros(d_model, d_out, **kw)  # sum (x - mx)(y - my)^T: (d_in, d_out)

    def update(self, x: Tensor, y: Tensor) -> None:
        x = x.detach().reshape(-1, self.cxx.shape[0]).to(self.cxx)  # (n, d_in)
        y = y.detach().reshape(-1, self.cxy.shape[1]).to(self.cxy)  # (n, d_out)
        if x.shape[0] != y.shape[0]:
            raise LenspipeError(f"least squares: {x.shape[0]} inputs but {y.shape[0]} targets")
        nb, n = x.shape[0], self.n + x.shape[0]
        if nb == 0:
            return
        mx, my = x.mean(0), y.mean(0)  # (d_in,), (d_out,)
        dx, dy = mx - self.mean_x, my - self.mean_y  # between-group mean differences
        self.cxx += (x - mx).T @ (x - mx) + (self.n * nb / n) * torch.outer(dx, dx)
        self.cxy += (x - mx).T @ (y - my) + (self.n * nb / n) * torch.outer(dx, dy)
        self.mean_x += dx * (nb / n)
        self.mean_y += dy * (nb / n)
        self.n = n

    def solve(self, ridge: float = 1e-6, intercept: bool = True) -> tuple[Tensor, Tensor]:
        """(W (d_out, d_in), b (d_out,)) float32 minimising |Y - X W^T - b|^2 + lam |W|^2;
        ``intercept=False``: b = 0, minimising |Y - X W^T|^2 + lam |W|^2 (a map without a bias).

        lam = ridge * trace(Cxx) / d_in: relative to the average variance, so the same
        ``ridge`` suits any activation scale; it keeps rank-deficient X solvable. Without an
        intercept the raw moments are needed: they are the centred ones plus n m m^T, a sum
        of positive terms, so rebuilding them here loses no digits (the subtraction the
        centred update avoids is the other direction).
        """
        xx, xy, lam = self._moments(ridge, intercept)
        d_in = xx.shape[0]
        reg = xx + lam * torch.eye(d_in, dtype=xx.dtype, device=xx.device)
        w = torch.linalg.solve(reg, xy).T  # (d_out, d_in)
        b = self.mean_y - w @ self.mean_x if intercept else torch.zeros_like(self.mean_y)  # (d_out,)
        return w.float(), b.float()

    def solve_diagonal(self, ridge: float = 1e-6, intercept: bool = True) -> tuple[Tensor, Tensor]:
        """(s (d,), c (d,)) float32 minimising |Y - X diag(s) - c|^2 + lam |s|^2: each output
        dimension fitted from its own input dimension alone (d_in == d_out), with the same
        relative ridge as ``solve``; ``intercept=False``: c = 0."""
        if self.cxx.shape[0] != self.cxy.shape[1]:
            raise LenspipeError(
                f"a per-dimension fit needs as many inputs as outputs, not {self.cxx.shape[0]} and {self.cxy.shape[1]}"
            )
        xx, xy, lam = self._moments(ridge, intercept)
        s = xy.diagonal() / (xx.diagonal() + lam)  # (d,)
        c = self.mean_y - s * self.mean_x if intercept else torch.zeros_like(self.mean_y)  # (d,)
        return s.float(), c.float()

    def _moments(self, ridge: float, intercept: bool) -> tuple[Tensor, Tensor, float]:
        """(sum xx^T, sum xy^T, lam): centred for a fit with an intercept, raw without."""
        if self.n < 2:
            raise LenspipeError(f"least squares needs at least 2 samples, got {self.n}")
        d_in = self.cxx.shape[0]
        lam = ridge * max(self.cxx.trace().item() / d_in, torch.finfo(torch.float64).tiny)
        xx, xy = self.cxx, self.cxy
        if not intercept:
            xx = xx + self.n * torch.outer(self.mean_x, self.mean_x)  # sum x x^T
            xy = xy + self.n * torch.outer(self.mean_x, self.mean_y)  # sum x y^T
        return xx, xy, lam


def init_translator_lstsq(translator, W: Tensor, b: Tensor) -> None:
    """Set a translator so that translator(h) == W h + b (kinds registered with ``lstsq``;
    b must be 0 for one without an intercept, ``Translator.intercept``)."""
    translator.set_affine_map(W, b)
