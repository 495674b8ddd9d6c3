"""Extract the small replay traces that ``edge-infer simulate`` publishes, from the real data sets.

Run once (needs aeon, which the ``train`` extra installs); the outputs are committed so that
``simulate`` and ``demo`` need neither aeon nor torch::

    python -m devices.extract_traces            # writes devices/traces/*.npz

* ``acsf1.npz``: ACSF1 (UCR/UEA archive, ``split="test"``), appliance power consumption
  sampled every 10 s (0.1 Hz), 1460 samples (about 4 h) per series, 10 classes. The archive
  stores every series z-normalised; the simulator maps it back to plausible watts per class
  (a positive affine map, to which a model that normalises its input window is blind).
  ``per_class`` series of each class with their true class index.
* ``basicmotions.npz``: BasicMotions test split, a wrist-worn smartwatch's accelerometer and
  gyroscope (6 channels) at 10 Hz, 100 samples per series, 4 activities.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "traces"

#: ACSF1 class i ("0".."9" in the archive), as in the data set's description.
ACSF1_CLASSES = (
    "mobile_phone_charger",
    "coffee_machine",
    "computer_station",
    "fridge_freezer",
    "hifi_system",
    "lamp_cfl",
    "laptop_charger",
    "microwave_oven",
    "printer",
    "television",
)
#: Typical standby and peak draw in watts per class, to turn z-scores back into watts.
ACSF1_WATTS = (
    (0.3, 6.0),
    (1.0, 1400.0),
    (35.0, 180.0),
    (1.5, 160.0),
    (4.0, 45.0),
    (0.5, 18.0),
    (0.5, 75.0),
    (2.0, 1250.0),
    (3.0, 450.0),
    (0.8, 120.0),
)
BASICMOTIONS_CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")


def extract(out: Path = OUT, per_class: int = 3, seed: int = 0) -> list[Path]:
    from aeon.datasets import load_classification

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y, meta = load_classification("ACSF1", split="test", return_metadata=True)
    classes = list(meta["class_values"])
    if classes != [str(i) for i in range(10)]:
        raise SystemExit(f"unexpected ACSF1 classes {classes}")
    labels = np.array([int(v) for v in y])
    picks = []
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        picks += sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    picks_arr = np.array(picks)
    acsf1 = out / "acsf1.npz"
    np.savez_compressed(
        acsf1,
        power_z=x[picks_arr, 0, :].astype(np.float32),
        label=labels[picks_arr].astype(np.int64),
        test_index=picks_arr.astype(np.int64),
        classes=np.array(ACSF1_CLASSES),
        watts=np.array(ACSF1_WATTS, dtype=np.float32),
        sample_period_s=np.float32(10.0),
    )
    xb, yb, metab = load_classification("BasicMotions", split="test", return_metadata=True)
    bclasses = list(metab["class_values"])
    blabels = np.array([bclasses.index(str(v)) for v in yb])
    bm = out / "basicmotions.npz"
    np.savez_compressed(
        bm,
        imu=xb.astype(np.float32),
        label=blabels.astype(np.int64),
        classes=np.array(bclasses),
        channels=np.array(BASICMOTIONS_CHANNELS),
        sample_period_s=np.float32(0.1),
    )
    return [acsf1, bm]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in extract(args.out, args.per_class, args.seed):
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
