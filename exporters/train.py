"""Training: a recipe and its data in, a checkpoint with metrics and plots out."""

from __future__ import annotations

import copy
import hashlib
import math
import mmap
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from exporters.data import DataSet, load_dataset
from exporters.metrics import evaluate
from exporters.plots import plot_confusion, plot_history
from exporters.recipe import Recipe, recipe_from_dict
from exporters.rocket import WithRocket, fit_rocket
from exporters.stats import stats_of_split
from exporters.templates import EdgeModel, Served, build_model, norm_stats

CHECKPOINT_FORMAT = "edge-infer-checkpoint/1"


@dataclass
class TrainResult:
    checkpoint: Path
    served: Served
    dataset: DataSet
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    plots: list[Path]


class Progress:
    """A dependency-free progress bar: redraws in place on a terminal, prints milestones otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        width = 24
        filled = round(width * step / self.total)
        elapsed = time.monotonic() - self.start
        eta = elapsed / step * (self.total - step) if step else 0.0
        line = (
            f"epoch {step:>4}/{self.total} [{'#' * filled}{'.' * (width - filled)}] {text} ({eta:.0f}s left)"
        )
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif step in (1, self.total) or step % max(1, self.total // 10) == 0:
            self.stream.write(line + "\n")

    def close(self, text: str = "") -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\n")
            if text:
                self.stream.write(text + "\n")
            self.stream.flush()


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def sample_shape(ds: DataSet) -> tuple[int, ...]:
    if ds.layout == "window":
        assert ds.window is not None
        return (ds.window, ds.x_train.shape[-1])
    if ds.layout == "grid":
        return tuple(ds.x_train.shape[1:])
    return (ds.x_train.shape[1],)


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names and little-endian float bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


@torch.no_grad()
def predict(served: Served, x: NDArray[np.float32], batch: int = 256) -> NDArray[np.float32]:
    """PyTorch outputs of the served model (probabilities or values) for raw inputs."""
    served.eval()
    outs = [
        served(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy()
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(outs) if outs else np.zeros((0,), dtype=np.float32)


class _Batches:
    """Deterministic mini-batches with optional random crops and noise."""

    def __init__(self, ds: DataSet, recipe: Recipe, rng: np.random.Generator) -> None:
        self.ds, self.recipe, self.rng = ds, recipe, rng
        x = ds.x_train
        # noise scale per channel, in raw units (noise is specified in normalised units)
        self.scale = x.reshape(-1, x.shape[-1]).std(axis=0) if ds.layout != "grid" else np.array(x.std())

    def __iter__(self) -> Any:
        ds, spec = self.ds, self.recipe.train
        n = len(ds.x_train)
        order = self.rng.permutation(n)
        for start in range(0, n, spec.batch_size):
            idx = order[start : start + spec.batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm needs two samples
                continue
            xb = ds.x_train[idx]
            if ds.layout == "window" and ds.window is not None:
                crop = spec.crop_length or ds.window
                if spec.random_crop and xb.shape[1] > crop:
                    starts = self.rng.integers(0, xb.shape[1] - crop + 1, len(idx))
                    xb = np.stack([xb[i, s : s + crop] for i, s in enumerate(starts)])
                elif xb.shape[1] > ds.window:
                    xb = xb[:, -ds.window :]
            if spec.noise > 0:
                xb = xb + self.rng.normal(size=xb.shape).astype(np.float32) * spec.noise * self.scale
            yield np.ascontiguousarray(xb, dtype=np.float32), ds.y_train[idx]


def _loss(
    model: EdgeModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    recipe: Recipe,
    weight: torch.Tensor | None,
    y_mean: float,
    y_std: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    if recipe.task == "classification":
        loss = F.cross_entropy(out, y, weight=weight, label_smoothing=recipe.train.label_smoothing)
        return loss, out
    target = (y - y_mean) / y_std
    return F.smooth_l1_loss(out[:, 0], target), out[:, 0] * y_std + y_mean


@torch.no_grad()
def _evaluate_split(
    served: Served,
    ds: DataSet,
    x: NDArray[np.float32],
    y: NDArray[Any],
    *,
    recipe: Recipe,
    weight: torch.Tensor | None,
) -> dict[str, float]:
    if len(x) == 0:
        return {}
    xin = ds.model_input(x)
    served.eval()
    out = served.model(torch.from_numpy(xin))
    yt = torch.from_numpy(y)
    if recipe.task == "classification":
        loss = float(F.cross_entropy(out, yt, weight=weight))
        return {"loss": loss, "accuracy": float((out.argmax(1) == yt).float().mean())}
    pred = out[:, 0] * served.y_std + served.y_mean
    target = (yt - served.y_mean) / served.y_std
    return {"loss": float(F.smooth_l1_loss(out[:, 0], target)), "mae": float((pred - yt).abs().mean())}


def executable_memory_allowed() -> bool:
    """Whether this process may map memory both writable and executable.

    A systemd unit with ``MemoryDenyWriteExecute=yes`` (edge-infer's own units) forbids it, and
    oneDNN, the JIT behind torch's CPU convolutions and matmuls, then fails ("could not create a
    primitive"). ``learn`` started by the daemon inherits that sandbox."""
    try:
        with mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC):
            return True
    except OSError:
        return False


def use_jit_kernels_if_allowed(stream: TextIO = sys.stderr) -> bool:
    """Turn torch's oneDNN kernels off where executable memory is denied (its plain ATen kernels
    need none; the small models here train a little slower). True when the JIT stays on."""
    if executable_memory_allowed():
        return True
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a ContextProp setter in torch
    print(
        "training: executable memory is denied (MemoryDenyWriteExecute): torch's oneDNN kernels "
        "are off, its plain kernels train instead",
        file=stream,
    )
    return False


def train(
    recipe: Recipe,
    out_dir: Path,
    data_override: Path | None = None,
    *,
    progress: bool = True,
    dataset: DataSet | None = None,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Train the recipe's model; write the checkpoint (``<out_dir>/<name>.pt`` unless
    ``checkpoint`` is given), metrics and PNG plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    use_jit_kernels_if_allowed()
    spec = recipe.train
    seed_everything(spec.seed, spec.threads)
    ds = dataset or load_dataset(recipe, data_override)
    classification = recipe.task == "classification"
    n_out = len(ds.labels) if classification else 1
    mean, std = norm_stats(
        ds.model_input(ds.x_train), ds.layout, recipe.model.normalisation, recipe.model.family
    )
    shape = sample_shape(ds)
    model = build_model(recipe.model, ds.layout, shape, n_out, task=recipe.task, mean=mean, std=std)
    y_mean = float(ds.y_train.mean()) if not classification else 0.0
    y_std = float(max(ds.y_train.std(), 1e-6)) if not classification else 1.0
    served = Served(model, y_mean, y_std)

    weight: torch.Tensor | None = None
    if classification and spec.class_weights:
        counts = np.bincount(ds.y_train, minlength=n_out).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_out, 0.0)
        weight = torch.tensor(w, dtype=torch.float32)

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    rng = np.random.default_rng(spec.seed)
    batches = _Batches(ds, recipe, rng)
    has_val = len(ds.x_val) > 0
    best_state = copy.deepcopy(model.state_dict())
    best_loss, best_epoch, stale = math.inf, 0, 0
    history: list[dict[str, float]] = []
    bar = Progress(spec.epochs, progress)
    key = "accuracy" if classification else "mae"
    for epoch in range(1, spec.epochs + 1):
        model.train()
        total, seen, correct, abs_err = 0.0, 0, 0, 0.0
        for xb_np, yb_np in batches:
            xb, yb = torch.from_numpy(xb_np), torch.from_numpy(yb_np)
            loss, out = _loss(model, xb, yb, recipe=recipe, weight=weight, y_mean=y_mean, y_std=y_std)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(loss.detach()) * len(yb)
            seen += len(yb)
            if classification:
                correct += int((out.argmax(1) == yb).sum())
            else:
                abs_err += float((out.detach() - yb).abs().sum())
        sched.step()
        row: dict[str, float] = {"epoch": epoch, "train_loss": total / max(seen, 1)}
        row[f"train_{key}"] = (correct if classification else abs_err) / max(seen, 1)
        val = _evaluate_split(served, ds, ds.x_val, ds.y_val, recipe=recipe, weight=weight)
        row.update({f"val_{k}": v for k, v in val.items()})
        history.append(row)
        text = f"loss {row['train_loss']:.4f}"
        if has_val:
            text += f" val_loss {val['loss']:.4f} val_{key} {val[key]:.3f}"
            if val["loss"] < best_loss - 1e-6:
                best_loss, best_epoch, stale = val["loss"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        bar.update(epoch, text)
        if has_val and stale >= spec.patience:
            bar.close(
                f"early stop at epoch {epoch}: best validation loss {best_loss:.4f} at epoch {best_epoch}"
            )
            break
    else:
        bar.close()
    if has_val:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    if isinstance(model.body, WithRocket):  # the branch beside the network, on the full training windows
        model.eval()
        with torch.no_grad():
            x_norm = model.norm(torch.from_numpy(ds.model_input(ds.x_train)))
        fit_rocket(model.body, x_norm, ds.y_train.astype(np.int64), weight, spec.seed)

    metrics: dict[str, Any] = {"best_epoch": best_epoch, "epochs_run": len(history)}
    for split, x, y in (("val", ds.x_val, ds.y_val), ("test", ds.x_test, ds.y_test)):
        if len(x):
            metrics[split] = evaluate(recipe.task, y, predict(served, ds.model_input(x)), ds.labels)
    drawn = [plot_history(history, out_dir / "training_curves.png", f"{recipe.name}: training")]
    if classification and "test" in metrics:
        drawn.append(
            plot_confusion(
                metrics["test"]["confusion_matrix"],
                ds.labels,
                out_dir / "confusion_matrix.png",
                f"{recipe.name}: test confusion (PyTorch)",
            )
        )
    meta = {
        "task": recipe.task,
        "layout": ds.layout,
        "features": ds.features,
        "units": ds.units,
        "labels": ds.labels,
        "window": ds.window,
        "sample_period_s": ds.sample_period_s,
        "grid": list(ds.grid) if ds.grid else None,
        "sample_shape": list(shape),
        "n_out": n_out,
        "norm_mean": mean,
        "norm_std": std,
        "y_mean": y_mean,
        "y_std": y_std,
        "dataset": ds.describe(),
        "training_stats": stats_of_split(ds),
    }
    path = checkpoint or out_dir / f"{recipe.name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "recipe": recipe.model_dump(mode="json"),
            "state_dict": model.state_dict(),
            "meta": meta,
            "metrics": metrics,
            "history": history,
            "weights_sha256": weights_sha256(model),
            "torch_version": str(torch.__version__),
        },
        path,
    )
    plots = [p for p in drawn if p is not None]
    return TrainResult(path, served, ds, metrics, history, plots)


@dataclass
class Checkpoint:
    path: Path
    recipe: Recipe
    served: Served
    meta: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    weights_sha256: str


def load_checkpoint(path: Path) -> Checkpoint:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an edge-infer checkpoint (written by 'edge-infer train')")
    recipe = recipe_from_dict(blob["recipe"], str(path))
    meta = blob["meta"]
    model = build_model(
        recipe.model,
        meta["layout"],
        tuple(meta["sample_shape"]),
        meta["n_out"],
        task=meta["task"],
        mean=meta["norm_mean"],
        std=meta["norm_std"],
    )
    model.load_state_dict(blob["state_dict"])
    if isinstance(model.body, WithRocket):  # a checkpoint is written after the branch was fitted
        model.body.ready = True
    served = Served(model, meta["y_mean"], meta["y_std"]).eval()
    return Checkpoint(path, recipe, served, meta, blob["metrics"], blob["history"], blob["weights_sha256"])
