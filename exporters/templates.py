"""Model templates for the three families of smart-home tasks.

Every template is an :class:`EdgeModel`: an input normalisation layer (raw units
in, so the exported graph needs no preprocessing outside it), a body that returns
logits (classification, trained with cross-entropy) or a value (regression), and
:class:`Served`, the wrapper that is exported: it adds softmax for classifiers or
maps a regression output back to its unit. Shapes are batch-first throughout:

* :class:`MLP` - snapshot ``[B, F]``, or a short window ``[B, T, C]`` summarised in
  the graph by :class:`WindowSummary` (latest value, change, spread per channel);
* :class:`CNN1D` - window ``[B, T, C]`` (any T: global average pooling);
* :class:`CNN2D` - grid ``[B, H, W]``;
* :class:`RNN` - window ``[B, T, C]`` with an LSTM or GRU (any T).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exporters.recipe import PER_WINDOW_KINDS, TemplateSpec
from exporters.rocket import RocketBranch, WithRocket


class InputNorm(nn.Module):
    """Normalisation of raw units inside the graph.

    ``zscore``: ``(x - mean) / std`` with per-feature statistics of the training set
    (feature is the last axis for snapshot and window, the whole frame for grids).
    ``per_window``: each window z-normalised over its own time axis, per channel.
    ``per_window_level``: ``per_window`` followed by one more channel per input channel, the
    window's log level ``log(std)`` z-scored with training-set statistics (``mean``/``std``),
    constant over the window: ``[B, T, C]`` -> ``[B, T, 2C]``. Shape and amplitude, where
    ``per_window`` alone keeps only the shape.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, kind: str, mean: Sequence[float], std: Sequence[float], eps: float = 1e-6) -> None:
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "zscore":
            return (x - self.mean) / self.std
        if self.kind in PER_WINDOW_KINDS:
            centred = x - x.mean(dim=1, keepdim=True)
            var = (centred * centred).mean(dim=1, keepdim=True) + self.eps
            shape = centred / torch.sqrt(var)
            if self.kind == "per_window":
                return shape
            level = (0.5 * torch.log(var) - self.mean) / self.std  # [B, 1, C]
            return torch.cat([shape, level.expand_as(shape)], dim=2)
        return x


class WindowSummary(nn.Module):
    """Derived features of a short window ``[B, T, C]`` -> ``[B, 3C]``, computed in the graph.

    Per channel: the latest reading, its change over the window (latest - oldest,
    e.g. the CO₂ rate of change) and the window's standard deviation. This lets a
    feed-forward network use trends while the daemon only sends raw readings.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x[:, -1, :]
        centred = x - x.mean(dim=1, keepdim=True)
        spread = torch.sqrt((centred * centred).mean(dim=1))
        return torch.cat([last, last - x[:, 0, :], spread], dim=1)


def window_summary_np(x: np.ndarray) -> np.ndarray:
    """numpy twin of :class:`WindowSummary` (for normalisation statistics)."""
    last = x[:, -1, :]
    return np.concatenate([last, last - x[:, 0, :], x.std(axis=1)], axis=1)


class MLP(nn.Module):
    """Feed-forward network over a snapshot ``[B, F]``."""

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.body(x))
        return logits


class CNN1D(nn.Module):
    """1-D convolutions over a window ``[B, T, C]``, global average pooling, linear head."""

    def __init__(
        self, n_channels: int, n_out: int, hidden: Sequence[int], kernels: Sequence[int], dropout: float
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = n_channels
        for i, h in enumerate(hidden):
            k = kernels[min(i, len(kernels) - 1)]
            blocks += [nn.Conv1d(width, h, k, padding=k // 2, bias=False), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x.transpose(1, 2))  # [B, C, T]
        logits: torch.Tensor = self.head(self.dropout(z.mean(dim=2)))
        return logits


class CNN2D(nn.Module):
    """2-D convolutions over a grid ``[B, H, W]`` (e.g. an 8x8 thermal array)."""

    def __init__(self, n_out: int, hidden: Sequence[int], kernels: Sequence[int], dropout: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = 1
        for i, h in enumerate(hidden):
            k = kernels[min(i, len(kernels) - 1)]
            blocks += [nn.Conv2d(width, h, k, padding=k // 2, bias=False), nn.BatchNorm2d(h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x.unsqueeze(1))  # [B, C, H, W]
        logits: torch.Tensor = self.head(self.dropout(z.mean(dim=(2, 3))))
        return logits


class RNN(nn.Module):
    """LSTM or GRU over a window ``[B, T, C]``; the last step's state feeds a linear head."""

    def __init__(self, cell: str, n_channels: int, n_out: int, hidden: Sequence[int], dropout: float) -> None:
        super().__init__()
        size, layers = hidden[0], max(1, len(hidden))
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            n_channels, size, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(size, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        logits: torch.Tensor = self.head(self.dropout(out[:, -1, :]))
        return logits


class EdgeModel(nn.Module):
    """Normalisation + body. ``forward`` returns logits (or the normalised value)."""

    def __init__(self, norm: nn.Module, body: nn.Module, task: str) -> None:
        super().__init__()
        self.norm = norm
        self.body = body
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(self.norm(x))
        return out


class Served(nn.Module):
    """What gets exported: raw units in, probabilities (softmax) or a value in its unit out."""

    def __init__(self, model: EdgeModel, y_mean: float = 0.0, y_std: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.y_mean = y_mean
        self.y_std = y_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        if self.model.task == "classification":
            return F.softmax(out, dim=-1)
        value: torch.Tensor = out[:, 0] * self.y_std + self.y_mean
        return value


def norm_stats(x: np.ndarray, layout: str, kind: str, family: str = "") -> tuple[list[float], list[float]]:
    """Per-feature mean/std of training data (``[]`` when the normalisation needs none).

    For ``per_window_level``: mean/std over the training windows of each channel's log level,
    ``0.5 * log(var + 1e-6)``, as :class:`InputNorm` computes it.
    """
    if kind == "per_window_level":
        log_level = 0.5 * np.log(x.astype(np.float64).var(axis=1) + 1e-6)  # [N, C]
        return log_level.mean(axis=0).tolist(), np.maximum(log_level.std(axis=0), 1e-6).tolist()
    if kind != "zscore":
        return [], []
    if layout == "window" and family == "mlp":
        x = window_summary_np(x)
    if layout == "grid":
        values = x.reshape(-1)
        return [float(values.mean())], [float(max(values.std(), 1e-6))]
    flat = x.reshape(-1, x.shape[-1])
    return flat.mean(axis=0).tolist(), np.maximum(flat.std(axis=0), 1e-6).tolist()


def build_model(
    spec: TemplateSpec,
    layout: str,
    sample_shape: tuple[int, ...],
    n_out: int,
    *,
    task: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> EdgeModel:
    """Instantiate the template the recipe names, checked against the data layout."""
    allowed = {"snapshot": {"mlp"}, "window": {"mlp", "cnn1d", "lstm", "gru"}, "grid": {"cnn2d"}}
    if spec.family not in allowed[layout]:
        raise ValueError(
            f"model family {spec.family!r} does not fit layout {layout!r}: use {allowed[layout]}"
        )
    per_window = spec.normalisation in PER_WINDOW_KINDS
    if per_window and layout != "window":
        raise ValueError(f"normalisation {spec.normalisation!r} needs the window layout")
    norm: nn.Module = InputNorm(spec.normalisation, mean, std)
    channels = sample_shape[-1] * (2 if spec.normalisation == "per_window_level" else 1)
    body: nn.Module
    if spec.family == "mlp" and layout == "window":
        if per_window:
            raise ValueError("a windowed mlp summarises the window itself: use normalisation zscore")
        norm = nn.Sequential(WindowSummary(), norm)
        body = MLP(3 * sample_shape[-1], n_out, spec.hidden, spec.dropout)
    elif spec.family == "mlp":
        body = MLP(sample_shape[0], n_out, spec.hidden, spec.dropout)
    elif spec.family == "cnn1d":
        body = CNN1D(channels, n_out, spec.hidden, spec.kernel_sizes, spec.dropout)
    elif spec.family == "cnn2d":
        body = CNN2D(n_out, spec.hidden, spec.kernel_sizes, spec.dropout)
    else:
        body = RNN(spec.family, channels, n_out, spec.hidden, spec.dropout)
    if spec.rocket_features:
        # the branch reads the window's shape channels (a level channel is constant over time)
        rocket = RocketBranch(sample_shape[0], sample_shape[-1], spec.rocket_features, n_out, spec.rocket_l2)
        body = WithRocket(body, rocket)
    return EdgeModel(norm, body, task)
