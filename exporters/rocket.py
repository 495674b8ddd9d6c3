"""A MiniRocket-style branch that lives in the exported graph (``model.rocket_features``).

The transform follows Dempster, Schmidt and Webb, "MiniRocket: A Very Fast (Almost) Deterministic
Transform for Time Series Classification" (KDD 2021), written here from the paper:

* 84 fixed kernels of length 9: every way to put weight 2 on three of the nine taps and -1 on the
  other six (so each kernel sums to zero);
* dilations ``floor(2 ** e)`` for ``e`` evenly spaced from 0 to ``log2((T - 1) / 8)`` (at most
  ``max_dilations`` of them, repeats merged), the features shared out over them by multiplicity;
* per (dilation, kernel), biases at quantiles of that kernel's output on one training window
  drawn at random, the quantiles taken from the low-discrepancy sequence ``frac(i * golden ratio)``;
* feature = PPV, the proportion of time steps whose output exceeds the bias. Every other
  (dilation, kernel) pair pads its convolution ("same" length) and takes the PPV over the whole
  window; the others take it over the steps that need no padding.

Each input channel gets its own share of the features (its own kernels' outputs and biases), so a
window ``[B, T, C]`` of any C works. The features are standardised with training statistics and a
linear head is fitted on them in closed form-like fashion (L-BFGS on the L2-penalised cross-entropy,
full batch), after the network it sits beside has trained. Everything is ``Conv1d``, comparisons
and means: ONNX opset 17, any T (the PPV is a mean over time), any batch.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

KERNEL_LENGTH = 9
#: the 84 kernels: which three taps carry weight 2
TWOS = list(itertools.combinations(range(KERNEL_LENGTH), 3))
GOLDEN = (math.sqrt(5.0) + 1.0) / 2.0


def kernel_weights() -> NDArray[np.float32]:
    """``[84, 9]``: -1 everywhere, 2 on each kernel's three taps."""
    w = -np.ones((len(TWOS), KERNEL_LENGTH), dtype=np.float32)
    for k, taps in enumerate(TWOS):
        w[k, list(taps)] = 2.0
    return w


def dilation_plan(window: int, n_features: int, max_dilations: int = 32) -> list[tuple[int, int]]:
    """``[(dilation, features per kernel at it)]`` for one channel of ``window`` samples."""
    if window < KERNEL_LENGTH:
        raise ValueError(f"rocket features need windows of at least {KERNEL_LENGTH} samples, got {window}")
    per_kernel = max(1, n_features // len(TWOS))
    n_dil = min(per_kernel, max_dilations)
    top = math.log2((window - 1) / (KERNEL_LENGTH - 1))
    raw = np.floor(np.power(2.0, np.linspace(0.0, top, n_dil))).astype(np.int64)
    dilations, counts = np.unique(raw, return_counts=True)
    share = (counts * (per_kernel / n_dil)).astype(np.int64)
    share[: per_kernel - int(share.sum())] += 1  # the remainder, to the shortest dilations
    return [(int(d), int(s)) for d, s in zip(dilations, share, strict=True) if s > 0]


class RocketBranch(nn.Module):
    """Fixed convolutions -> PPV features -> standardisation -> linear head (logits).

    Built with the right shapes from ``(window, channels, n_features, n_out)``; :meth:`fit_biases`
    and :meth:`fit_head` fill in what the training data decides, and a checkpoint's state dict
    restores them, so a loaded model needs no data. Features are ordered by dilation; within one,
    the padded kernels' (channel-major, ``share`` biases each) and then the unpadded ones'.
    """

    weight: torch.Tensor
    feat_mean: torch.Tensor
    feat_std: torch.Tensor

    def __init__(self, window: int, channels: int, n_features: int, n_out: int, l2: float = 0.05) -> None:
        super().__init__()
        self.channels = channels
        self.l2 = l2
        self.plan = dilation_plan(window, max(1, n_features // channels))
        n_k = len(TWOS)
        w = torch.from_numpy(kernel_weights())  # [84, 9]
        # grouped convolution: channel c's 84 kernels are output channels c*84 .. c*84+83
        self.register_buffer("weight", w.repeat(channels, 1).unsqueeze(1).contiguous())
        self.groups: list[tuple[int, int, bool]] = []  # (dilation, share, padded) per buffer pair
        n = 0
        for i, (d, share) in enumerate(self.plan):
            for padded in (True, False):
                # kernels alternate between padded and not, and the pattern flips per dilation
                parity = 0 if padded else 1
                ks = [c * n_k + k for c in range(channels) for k in range(n_k) if (i + k) % 2 == parity]
                j = len(self.groups)
                self.register_buffer(f"channels_{j}", torch.tensor(ks, dtype=torch.int64))
                self.register_buffer(f"thresholds_{j}", torch.zeros(len(ks), share))
                self.groups.append((d, share, padded))
                n += len(ks) * share
        self.n_features = n
        self.register_buffer("feat_mean", torch.zeros(n))
        self.register_buffer("feat_std", torch.ones(n))
        with torch.random.fork_rng():  # fitted later: leave the network's random draws as they were
            self.head = nn.Linear(n, n_out)

    def _group(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        chans: torch.Tensor = getattr(self, f"channels_{j}")
        thr: torch.Tensor = getattr(self, f"thresholds_{j}")
        return chans, thr

    def conv(self, x: torch.Tensor, dilation: int) -> torch.Tensor:
        """``[B, C, T]`` -> ``[B, 84 C, T]``, padded to the input's length."""
        half = (KERNEL_LENGTH - 1) // 2 * dilation
        return F.conv1d(x, self.weight, padding=half, dilation=dilation, groups=self.channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` (already normalised) -> PPV features ``[B, n_features]``."""
        z = x.transpose(1, 2)
        out = []
        for i, (d, _share) in enumerate(self.plan):
            y = self.conv(z, d)  # one convolution per dilation, read by its padded and unpadded groups
            half = (KERNEL_LENGTH - 1) // 2 * d
            for j, padded in ((2 * i, True), (2 * i + 1, False)):
                chans, thr = self._group(j)
                sel = y[:, chans, :]  # [B, K, T]
                if not padded:  # the steps the unpadded convolution has: an empty range counts 0
                    sel = sel[:, :, half : sel.shape[2] - half]
                above = (sel.unsqueeze(2) > thr.unsqueeze(2)).to(z.dtype)  # [B, K, share, T']
                out.append((above.sum(dim=3) / max(1, sel.shape[2])).flatten(1))
        return torch.cat(out, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = (self.features(x) - self.feat_mean) / self.feat_std
        logits: torch.Tensor = self.head(f)
        return logits

    @torch.no_grad()
    def fit_biases(self, x: torch.Tensor, seed: int) -> None:
        """Biases from quantiles of each (dilation, kernel)'s output on one random training window."""
        rng = np.random.default_rng(seed)
        z = x.transpose(1, 2)
        n_k = len(TWOS)
        quantiles = np.mod(np.arange(1, self.n_features + 1) * GOLDEN, 1.0)
        at = 0
        for j, (d, share, padded) in enumerate(self.groups):
            chans, thr = self._group(j)
            half = (KERNEL_LENGTH - 1) // 2 * d
            for row, channel in enumerate(chans.tolist()):
                pick = int(rng.integers(len(z)))
                c = channel // n_k
                kernel = self.weight[channel : channel + 1]
                y = F.conv1d(z[pick : pick + 1, c : c + 1], kernel, padding=half, dilation=d)[0, 0]
                if not padded and y.shape[0] > 2 * half:
                    y = y[half : y.shape[0] - half]
                q = quantiles[at : at + share]
                thr[row] = torch.from_numpy(np.quantile(y.numpy(), q).astype(np.float32))
                at += share

    def fit_head(
        self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, batch: int = 64
    ) -> None:
        """Standardise the features and fit the head: L-BFGS on mean cross-entropy + l2 * |W|^2."""
        with torch.no_grad():
            feats = torch.cat([self.features(x[i : i + batch]) for i in range(0, len(x), batch)])
            self.feat_mean.copy_(feats.mean(dim=0))
            self.feat_std.copy_(feats.std(dim=0).clamp(min=1e-3))
            f = (feats - self.feat_mean) / self.feat_std
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        opt = torch.optim.LBFGS(self.head.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(self.head(f), y, weight=weight) + self.l2 * self.head.weight.pow(2).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]


class WithRocket(nn.Module):
    """A classifier network and a :class:`RocketBranch` side by side: the mean of their probabilities.

    ``forward`` returns ``log`` of the mean probability, so the :class:`~exporters.templates.Served`
    softmax gives that mean back. Until :attr:`ready` is set (by :func:`fit_rocket` after the
    network trained, or when a checkpoint is loaded), ``forward`` returns the network's own logits,
    which is what training optimises.
    """

    def __init__(self, net: nn.Module, rocket: RocketBranch) -> None:
        super().__init__()
        self.net = net
        self.rocket = rocket
        self.ready = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        if not self.ready:
            return logits
        shape = x[:, :, : self.rocket.channels]
        mean = 0.5 * F.softmax(logits, dim=-1) + 0.5 * F.softmax(self.rocket(shape), dim=-1)
        return torch.log(mean.clamp(min=1e-12))


def fit_rocket(
    body: WithRocket, x_norm: torch.Tensor, y: NDArray[np.int64], weight: torch.Tensor | None, seed: int
) -> None:
    """Fit the branch on normalised training windows ``[N, T, C]`` and switch the mean on."""
    x_norm = x_norm[:, :, : body.rocket.channels]
    body.rocket.fit_biases(x_norm, seed)
    body.rocket.fit_head(x_norm, torch.as_tensor(y, dtype=torch.int64), weight)
    body.ready = True
