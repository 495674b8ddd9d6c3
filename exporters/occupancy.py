"""The occupancy data set, simulated with :mod:`devices.roomsim` (no real data set ships here).

Rooms are drawn at random (home offices, living rooms, bedrooms, meeting rooms with
varied volume, ventilation, window orientation, season, latitude and sensors) and
simulated for several days at one sample per ``sample_period_s``. Each sample is the
last ``window`` readings of temperature, humidity, illuminance and CO₂ (oldest
first) and the label is whether the room is occupied at the last reading. Whole rooms
go to one split: the test rooms are never seen in training.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from exporters.data import DataSet
from exporters.recipe import DataSpec

FEATURES = ["temperature", "humidity", "illuminance", "co2"]
UNITS = {"temperature": "°C", "humidity": "%", "illuminance": "lx", "co2": "ppm"}
LABELS = ["empty", "occupied"]


def _windows(data: dict[str, np.ndarray], window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    series = np.stack([data[f] for f in FEATURES], axis=1).astype(np.float32)  # [N, 4]
    ends = np.arange(window - 1, len(series), stride)
    idx = ends[:, None] - np.arange(window - 1, -1, -1)[None, :]
    return series[idx], data["occupancy"][ends].astype(np.int64)


def occupancy_dataset(roomsim: ModuleType, spec: DataSpec, seed: int) -> DataSet:
    p = spec.params
    n_train, n_val, n_test = (
        int(p.get("train_rooms", 24)),
        int(p.get("val_rooms", 6)),
        int(p.get("test_rooms", 10)),
    )
    days = float(p.get("days", 5))
    period = float(spec.sample_period_s or 60.0)
    window = int(spec.window or 11)
    stride = int(spec.stride or 5)
    sim_seed = int(p.get("seed", seed))
    rooms = roomsim.simulate_rooms(n_train + n_val + n_test, hours=24 * days, period_s=period, seed=sim_seed)
    # rooms cycle through the schedules; shuffle which rooms are held out, deterministically
    order = np.random.default_rng(sim_seed).permutation(len(rooms))
    parts: dict[str, list[int]] = {
        "train": order[:n_train].tolist(),
        "val": order[n_train : n_train + n_val].tolist(),
        "test": order[n_train + n_val :].tolist(),
    }
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, ids in parts.items():
        xs, ys = zip(*(_windows(rooms[i][1], window, stride) for i in ids), strict=True)
        arrays[split] = (np.concatenate(xs), np.concatenate(ys))
    keys = ("name", "schedule", "floor_area_m2", "ach", "day_of_year")
    test_rooms: list[dict[str, Any]] = [{k: getattr(rooms[i][0], k) for k in keys} for i in parts["test"]]
    return DataSet(
        "roomsim-occupancy",
        "classification",
        "window",
        list(FEATURES),
        *arrays["train"],
        *arrays["val"],
        *arrays["test"],
        labels=list(LABELS),
        units=dict(UNITS),
        window=window,
        sample_period_s=period,
        pooled=True,
        info={
            "name": "roomsim-occupancy (simulated)",
            "source": "devices.roomsim.simulate_rooms: simulated rooms, not real measurements",
            "split": f"by room: {n_train} training, {n_val} validation, {n_test} test rooms "
            "never seen in training",
            "simulator": "devices/roomsim.py: CO2 mass balance with ventilation and windows, occupant "
            "heat and moisture, daylight and lamps, thermostat, sensor noise, offsets and drift; "
            "schedules home_office, family, bedroom, meeting_room",
            "days_per_room": days,
            "simulation_seed": sim_seed,
            "test_groups": test_rooms,
        },
    )
