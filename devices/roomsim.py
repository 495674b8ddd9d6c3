"""A physically grounded simulator of one room's climate sensors and its occupants.

Pure numpy, deterministic for a seed. It produces what a ceiling or desk sensor
(temperature, relative humidity, illuminance, CO₂) would report in a room used
on a schedule, together with the ground truth (number of occupants, 0/1
occupancy, lamps, open window). It is meant for training and testing occupancy
models and for the simulated home of ``edge-infer simulate``.

Model (one well-mixed zone, state advanced with the exact solution of each
linear balance over a sub-step of at most 60 s, inputs held constant):

CO₂ mass balance
    ``V dC/dt = Q (C_out - C) + G``, with ``Q = ACH · V / 3600`` (m³/s) and
    ``G`` the occupants' CO₂ generation: about 0.005 L/s per seated adult
    (ASHRAE 62.1 / CIBSE: 0.0052 L/s at 1.2 met), 0.0035 L/s asleep, 0.007 L/s
    standing/active (meeting rooms). Outdoor air is about 420 ppm. Opening a
    window adds several air changes per hour.
Heat balance
    ``C_th dT/dt = (UA + ρ c_p Q)(T_out - T) + P``, with a lumped capacity of
    the air and light furnishings, envelope conductance ``UA``, and gains
    ``P``: about 75 W sensible per seated adult (70 W asleep), lamps, solar
    gain through the window, and a thermostat-controlled heater (proportional,
    limited power, night set-back). Outdoor temperature follows a daily
    sinusoid around the season's mean.
Moisture balance
    absolute humidity ``W`` (g/m³) with ``V_eff dW/dt = Q (W_out - W) + M``,
    ``M`` about 50 g/h per seated adult (40 g/h asleep), ``V_eff`` a few times
    the room volume for the buffering of furnishings. Relative humidity is
    ``W / W_sat(T)`` with the Magnus formula.
Daylight
    Sun elevation and azimuth from latitude, day of year and solar time; clear-sky
    horizontal illuminance ``≈ 110 klx · sin(h) · e^(-0.18/sin(h))`` (direct part)
    plus diffuse skylight, dimmed by a slowly varying cloud cover; the room sees a
    daylight factor (1-4 % by window size) plus direct sun when the sun stands
    within 90° of the window's orientation. Bedrooms draw their blinds at night.
Lamps
    switched on by occupants who are awake when daylight falls below their
    threshold, off when the room empties (now and then forgotten for a while).
Sensors
    white noise, a fixed calibration offset and a slow random-walk drift
    (NDIR CO₂ is ±(30 ppm + 3 %) class); values are quantised as real sensors
    report them (0.01 °C, 0.1 %RH, 1 lx, 1 ppm).

Schedules: ``home_office`` (one person, weekday working hours with breaks),
``family`` (a living room, 0-4 people mornings and evenings, more at weekends),
``bedroom`` (1-2 sleepers at night, short visits in the day) and
``meeting_room`` (meetings of 2-8 people on weekdays).

>>> cfg = RoomConfig.random(np.random.default_rng(0))
>>> data = simulate_room(cfg, hours=24, period_s=60, seed=1)
>>> sorted(data)[:4]
['co2', 'humidity', 'illuminance', 'lamp']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Schedule = Literal["home_office", "family", "bedroom", "meeting_room"]
SCHEDULES: tuple[Schedule, ...] = ("home_office", "family", "bedroom", "meeting_room")

FloatArray = npt.NDArray[np.float64]

OUTDOOR_CO2_PPM = 420.0
RHO_CP_AIR = 1200.0  # J/(m³·K), volumetric heat capacity of air
DAY_S = 86400.0

# per-occupant rates by activity: CO₂ L/s, sensible heat W, moisture g/h
_ACTIVITY = {
    "asleep": (0.0035, 70.0, 40.0),
    "seated": (0.0050, 75.0, 50.0),
    "active": (0.0070, 90.0, 70.0),
}
_ORIENTATION = {
    "N": 0.0,
    "NE": 45.0,
    "E": 90.0,
    "SE": 135.0,
    "S": 180.0,
    "SW": 225.0,
    "W": 270.0,
    "NW": 315.0,
}


@dataclass(frozen=True)
class RoomConfig:
    """One room, its ventilation, windows, climate, users and sensor.

    All fields have physically plausible defaults (a 12 m² home office in
    early spring at 50° N); :meth:`random` draws a varied room.
    """

    name: str = "office"
    schedule: Schedule = "home_office"
    floor_area_m2: float = 12.0
    height_m: float = 2.5
    ach: float = 0.5  # air changes per hour with the window closed (infiltration or mechanical)
    window_ach: float = 4.0  # extra air changes per hour while a window is open
    window_opening: float = 0.3  # propensity to open the window when the air is stale (0-1)
    window_orientation: str = "S"  # N, NE, E, SE, S, SW, W, NW
    daylight_factor: float = 0.02  # indoor/outdoor diffuse illuminance, 1-5 %
    sun_factor: float = 0.03  # share of direct sun reaching the sensor when it faces the window
    lamp_lux: float = 300.0  # illuminance the lamps add at the sensor
    lamp_threshold_lux: float = 120.0  # occupants switch lamps on below this daylight level
    forget_lamp: float = 0.08  # probability that the lamp stays on after the room empties
    max_occupants: int = 1
    latitude_deg: float = 50.0
    day_of_year: int = 80  # start date (80 ≈ 21 March)
    start_weekday: int = 0  # 0 = Monday
    outdoor_mean_c: float = 8.0
    outdoor_swing_c: float = 4.0  # half the daily range
    outdoor_rh: float = 75.0  # mean outdoor relative humidity, %
    cloudiness: float = 0.5  # mean cloud cover 0 (clear) - 1 (overcast)
    heating_setpoint_c: float = 21.0
    night_setback_c: float = 3.0
    heater_w_per_m2: float = 80.0
    ua_w_per_k_per_m2: float = 2.0  # envelope conductance per m² of floor
    capacity_kj_per_k_per_m2: float = 40.0  # effective heat capacity per m² of floor
    moisture_buffer: float = 4.0  # effective volume multiplier for water vapour
    sensor_noise: float = 1.0  # scale of all sensor noise (0 = perfect sensor)

    @property
    def volume_m3(self) -> float:
        return self.floor_area_m2 * self.height_m

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def random(cls, rng: np.random.Generator, schedule: Schedule | None = None) -> RoomConfig:
        """A varied, plausible room: volume, ventilation, window orientation, season, users."""
        kind: Schedule = schedule if schedule is not None else SCHEDULES[int(rng.integers(len(SCHEDULES)))]
        area = {
            "home_office": rng.uniform(8, 16),
            "family": rng.uniform(18, 40),
            "bedroom": rng.uniform(10, 20),
            "meeting_room": rng.uniform(15, 35),
        }[kind]
        if kind == "meeting_room":
            ach = rng.uniform(1.5, 4.0)  # mechanical ventilation
            max_occ = int(rng.integers(6, 11))
        else:
            ach = float(np.exp(rng.uniform(np.log(0.2), np.log(1.5))))  # leaky to tight homes
            max_occ = {"home_office": 1, "family": int(rng.integers(3, 6)), "bedroom": 2}[kind]
        day = int(rng.integers(0, 365))
        season = math.cos(2 * math.pi * (day - 200) / 365.0)  # +1 midsummer, -1 midwinter
        outdoor_mean = 10.0 + 9.0 * season + rng.normal(0, 2.5)
        return cls(
            name=f"{kind}-{int(rng.integers(1000, 9999))}",
            schedule=kind,
            floor_area_m2=round(float(area), 1),
            height_m=round(float(rng.uniform(2.3, 3.0)), 2),
            ach=round(float(ach), 2),
            window_ach=round(float(rng.uniform(2.0, 8.0)), 1),
            window_opening=round(float(rng.uniform(0.0, 0.8)), 2),
            window_orientation=list(_ORIENTATION)[int(rng.integers(len(_ORIENTATION)))],
            daylight_factor=round(float(rng.uniform(0.008, 0.045)), 4),
            sun_factor=round(float(rng.uniform(0.0, 0.06)), 3),
            lamp_lux=round(float(rng.uniform(120, 600))),
            lamp_threshold_lux=round(float(rng.uniform(60, 250))),
            forget_lamp=round(float(rng.uniform(0.0, 0.15)), 2),
            max_occupants=max_occ,
            latitude_deg=round(float(rng.uniform(35, 62)), 1),
            day_of_year=day,
            start_weekday=int(rng.integers(7)),
            outdoor_mean_c=round(float(outdoor_mean), 1),
            outdoor_swing_c=round(float(rng.uniform(2, 7)), 1),
            outdoor_rh=round(float(rng.uniform(55, 90)), 1),
            cloudiness=round(float(rng.uniform(0.05, 0.95)), 2),
            heating_setpoint_c=round(float(rng.uniform(19, 23)), 1),
            night_setback_c=round(float(rng.uniform(0, 4)), 1),
            heater_w_per_m2=round(float(rng.uniform(50, 120))),
            ua_w_per_k_per_m2=round(float(rng.uniform(1.0, 3.5)), 2),
            capacity_kj_per_k_per_m2=round(float(rng.uniform(25, 70))),
            moisture_buffer=round(float(rng.uniform(2.5, 6.0)), 1),
            sensor_noise=round(float(rng.uniform(0.6, 1.5)), 2),
        )

    def with_(self, **changes: Any) -> RoomConfig:
        return replace(self, **changes)


# --------------------------------------------------------------------------- schedules

# (start s, end s, count, activity)
_Interval = tuple[float, float, int, str]


def _clock(rng: np.random.Generator, hour: float, sd_min: float) -> float:
    return (hour + rng.normal(0, sd_min / 60.0)) * 3600.0


def _with_breaks(
    rng: np.random.Generator, start: float, end: float, count: int, activity: str, *, rate_per_h: float
) -> list[_Interval]:
    """Split a presence into pieces separated by short absences (coffee, doorbell, bathroom)."""
    pieces: list[_Interval] = []
    t = start
    while t < end:
        gap_at = t + rng.exponential(3600.0 / rate_per_h) if rate_per_h > 0 else end
        stop = min(gap_at, end)
        if stop - t > 60:
            pieces.append((t, stop, count, activity))
        t = stop + rng.uniform(180, 900)
    return pieces


def _day_intervals(cfg: RoomConfig, rng: np.random.Generator, weekday: int) -> list[_Interval]:
    weekend = weekday >= 5
    out: list[_Interval] = []
    n_max = max(1, cfg.max_occupants)
    if cfg.schedule == "home_office":
        if weekend:
            if rng.random() < 0.3:  # a little weekend e-mail
                s = _clock(rng, rng.uniform(10, 17), 10)
                out += _with_breaks(rng, s, s + rng.uniform(900, 5400), 1, "seated", rate_per_h=0.5)
            return out
        if rng.random() < 0.08:  # day off
            return out
        start = _clock(rng, 8.5, 40)
        lunch = _clock(rng, 12.3, 25)
        back = lunch + rng.uniform(1800, 4200)
        end = _clock(rng, 17.3, 50)
        out += _with_breaks(rng, start, lunch, 1, "seated", rate_per_h=0.7)
        out += _with_breaks(rng, back, end, 1, "seated", rate_per_h=0.7)
        if rng.random() < 0.25:  # evening session
            s = _clock(rng, 20.5, 40)
            out += _with_breaks(rng, s, s + rng.uniform(1200, 5400), 1, "seated", rate_per_h=0.3)
        return out
    if cfg.schedule == "family":
        if not weekend:
            s = _clock(rng, 7.0, 20)
            out.append((s, s + rng.uniform(900, 2700), int(rng.integers(1, n_max + 1)), "active"))
            if rng.random() < 0.3:
                s = _clock(rng, 13.0, 60)
                out.append((s, s + rng.uniform(900, 3600), 1, "seated"))
            s = _clock(rng, 17.5, 45)
        else:
            s = _clock(rng, 8.5, 45)
            mid = _clock(rng, 12.5, 30)
            out.append((s, mid, int(rng.integers(1, n_max + 1)), "seated"))
            s = mid + rng.uniform(1800, 7200)
        end = _clock(rng, 22.3, 40)
        t = s
        while t < end:  # the evening: people come and go
            seg = min(end, t + rng.uniform(1200, 4800))
            out.append((t, seg, int(rng.integers(1, n_max + 1)), "seated"))
            t = seg + (rng.uniform(60, 1200) if rng.random() < 0.4 else 0.0)
        return out
    if cfg.schedule == "bedroom":
        sleepers = n_max if rng.random() < 0.8 else 1
        bed = _clock(rng, 23.0 if weekend else 22.6, 40)
        out.append((bed - rng.uniform(300, 1500), bed, sleepers, "seated"))  # reading before sleep
        wake = _clock(rng, 8.5 if weekend else 6.8, 30)
        out.append((bed, DAY_S + wake, sleepers, "asleep"))
        for _ in range(int(rng.poisson(1.2))):
            s = _clock(rng, rng.uniform(9, 21), 5)
            out.append((s, s + rng.uniform(120, 1200), 1, "active"))
        # the morning of this calendar day belongs to the previous night's interval
        return out
    # meeting room
    if weekend:
        return out
    t = _clock(rng, 8.7, 20)
    end = _clock(rng, 17.5, 30)
    while t < end:
        if rng.random() < 0.6:
            length = float(rng.choice([1800.0, 2700.0, 3600.0, 5400.0]))
            length += rng.normal(0, 240)
            people = int(rng.integers(2, n_max + 1))
            arrive = t + rng.uniform(0, 300)
            out.append((arrive, min(end + 3600, arrive + length), people, "active"))
            t = arrive + length
        t += rng.uniform(600, 3600)
    return out


def occupant_schedule(
    cfg: RoomConfig, t: FloatArray, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray]:
    """Occupant count and per-occupant CO₂/heat/moisture scale at each time of ``t`` (s from midnight)."""
    days = math.ceil((float(t[-1]) if len(t) else 0.0) / DAY_S) + 1
    count = np.zeros(len(t), dtype=np.float64)
    activity = np.zeros(len(t), dtype=np.int64)  # 0 seated, 1 asleep, 2 active
    codes = {"seated": 0, "asleep": 1, "active": 2}
    # the night before the first day (bedrooms are occupied at midnight)
    for day in range(-1, days):
        weekday = (cfg.start_weekday + day) % 7
        for start, end, n, act in _day_intervals(cfg, rng, weekday):
            a = int(np.searchsorted(t, day * DAY_S + start))
            b = int(np.searchsorted(t, day * DAY_S + end))
            if b > a:
                count[a:b] = np.maximum(count[a:b], n)
                activity[a:b] = codes[act]
    return count, activity.astype(np.float64)


# --------------------------------------------------------------------------- weather and sun


def sun_position(
    latitude_deg: float, day_of_year: FloatArray, solar_hour: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Sun elevation and azimuth (degrees, azimuth from north clockwise) — Cooper's declination."""
    lat = math.radians(latitude_deg)
    decl = np.radians(23.44) * np.sin(2 * np.pi * (284 + day_of_year) / 365.0)
    hour_angle = np.radians(15.0 * (solar_hour - 12.0))
    sin_el = np.sin(lat) * np.sin(decl) + np.cos(lat) * np.cos(decl) * np.cos(hour_angle)
    elevation = np.arcsin(np.clip(sin_el, -1, 1))
    cos_az = (np.sin(decl) - np.sin(elevation) * np.sin(lat)) / np.maximum(
        np.cos(elevation) * np.cos(lat), 1e-9
    )
    azimuth = np.degrees(np.arccos(np.clip(cos_az, -1, 1)))
    azimuth = np.where(hour_angle > 0, 360.0 - azimuth, azimuth)
    return np.degrees(elevation), azimuth


def _ar1(rng: np.random.Generator, n: int, dt: float, tau_s: float, sd: float) -> FloatArray:
    """A stationary AR(1) (Ornstein-Uhlenbeck) series with time constant ``tau_s``."""
    phi = math.exp(-dt / tau_s)
    noise = rng.normal(0, sd * math.sqrt(1 - phi * phi), n)
    out = np.empty(n)
    x = rng.normal(0, sd)
    for i in range(n):
        x = phi * x + noise[i]
        out[i] = x
    return out


def saturation_vapour_density(temp_c: FloatArray | float) -> FloatArray:
    """Saturation water vapour density in g/m³ (Magnus formula over water)."""
    t = np.asarray(temp_c, dtype=np.float64)
    e_s = 611.2 * np.exp(17.62 * t / (243.12 + t))  # Pa
    return np.asarray(e_s / (461.5 * (t + 273.15)) * 1000.0, dtype=np.float64)


# --------------------------------------------------------------------------- the simulation


def simulate_room(
    cfg: RoomConfig, *, hours: float, period_s: float = 60.0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Simulate ``hours`` of the room, sampled every ``period_s`` seconds.

    Returns arrays of equal length: ``t`` (s since the start, which is midnight
    of ``cfg.day_of_year``), the sensor readings ``temperature`` (°C),
    ``humidity`` (%RH), ``illuminance`` (lx), ``co2`` (ppm), and the ground
    truth ``occupants`` (count), ``occupancy`` (0/1), ``lamp`` (0/1),
    ``window`` (0/1 open), ``outdoor_temperature`` (°C) and the noiseless
    ``true_temperature``, ``true_humidity``, ``true_illuminance``, ``true_co2``.
    """
    if hours <= 0 or period_s <= 0:
        raise ValueError("hours and period_s must be positive")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; one of {', '.join(SCHEDULES)}")
    if cfg.window_orientation not in _ORIENTATION:
        raise ValueError(f"unknown window orientation {cfg.window_orientation!r}")
    rng = np.random.default_rng(seed)
    n_out = int(hours * 3600.0 // period_s) + 1
    sub = max(1, math.ceil(period_s / 60.0))
    dt = period_s / sub
    n = (n_out - 1) * sub + 1
    t = np.arange(n, dtype=np.float64) * dt

    count, activity = occupant_schedule(cfg, t, rng)
    rates = np.array([_ACTIVITY["seated"], _ACTIVITY["asleep"], _ACTIVITY["active"]])  # by activity code
    per_person = rates[activity.astype(np.int64)]
    co2_rate, heat_rate, moist_rate = per_person[:, 0], per_person[:, 1], per_person[:, 2]
    body = 1.0 + 0.1 * rng.standard_normal()  # people differ in size and metabolism
    co2_gen = count * co2_rate * 1e-3 * body  # m³/s
    heat_gen = count * heat_rate * body  # W
    moist_gen = count * moist_rate * body / 3600.0  # g/s

    # weather: daily outdoor temperature (minimum before dawn, maximum mid-afternoon), clouds
    day_of_year = cfg.day_of_year + t / DAY_S
    hour = (t % DAY_S) / 3600.0
    weather_drift = _ar1(rng, n, dt, 2 * DAY_S, 2.0)
    t_out = (
        cfg.outdoor_mean_c + cfg.outdoor_swing_c * np.cos(2 * np.pi * (hour - 15.0) / 24.0) + weather_drift
    )
    clouds = np.clip(cfg.cloudiness + _ar1(rng, n, dt, 3 * 3600.0, 0.25), 0.0, 1.0)
    rh_out = np.clip(cfg.outdoor_rh + 12.0 * np.cos(2 * np.pi * (hour - 4.0) / 24.0), 30, 100)
    w_out = rh_out / 100.0 * saturation_vapour_density(t_out)

    elevation, azimuth = sun_position(cfg.latitude_deg, day_of_year, hour)
    sin_h = np.sin(np.radians(np.maximum(elevation, 0.0)))
    direct = np.where(elevation > 0, 110_000.0 * sin_h * np.exp(-0.18 / np.maximum(sin_h, 0.02)), 0.0)
    diffuse = np.where(elevation > -3, 18_000.0 * np.clip(sin_h + 0.05, 0, None) ** 0.8, 0.0)
    overcast_diffuse = 0.35 * (direct + diffuse)
    outdoor_diffuse = (1 - clouds) * diffuse + clouds * overcast_diffuse
    outdoor_direct = direct * (1 - clouds) ** 2
    facing = np.cos(np.radians(azimuth - _ORIENTATION[cfg.window_orientation]))
    daylight = cfg.daylight_factor * outdoor_diffuse + cfg.sun_factor * outdoor_direct * np.clip(
        facing, 0, None
    ) * np.clip(1.2 - sin_h, 0, 1)
    if cfg.schedule == "bedroom":  # blinds drawn from bedtime until getting up
        asleep = activity == 1
        daylight = np.where(asleep, daylight * 0.03, daylight)
    # a slowly moving curtain/shade changes the daylight factor a little
    daylight = daylight * np.exp(_ar1(rng, n, dt, 6 * 3600.0, 0.08))

    # lamps: on while awake occupants find it dark; now and then left on after leaving
    present = count > 0
    awake = present & (activity != 1)
    wants_lamp = awake & (daylight < cfg.lamp_threshold_lux)
    if cfg.schedule == "meeting_room":
        wants_lamp = awake & (daylight < cfg.lamp_threshold_lux * 2.5)
    lamp = np.zeros(n, dtype=bool)
    on = False
    forgotten_until = -1.0
    for i in range(n):
        if wants_lamp[i]:
            on = True
            forgotten_until = -1.0
        elif on and not present[i]:
            if forgotten_until < 0:
                forgotten_until = t[i] + (rng.exponential(5400.0) if rng.random() < cfg.forget_lamp else 0.0)
            if t[i] >= forgotten_until:
                on = False
        elif on and present[i] and daylight[i] > cfg.lamp_threshold_lux * 3:
            on = False  # bright enough again
        elif on and activity[i] == 1:
            on = False  # lights out for the night
        lamp[i] = on
    lamp_lux = cfg.lamp_lux * (1.0 + 0.05 * rng.standard_normal())
    illuminance_true = daylight + lamp * lamp_lux

    # the three balances, stepped exactly with the window decided by the occupants
    volume = cfg.volume_m3
    ua = cfg.ua_w_per_k_per_m2 * cfg.floor_area_m2
    capacity = cfg.capacity_kj_per_k_per_m2 * 1000.0 * cfg.floor_area_m2
    heater_max = cfg.heater_w_per_m2 * cfg.floor_area_m2
    heater_gain = heater_max / 1.5  # W/K: full power 1.5 K below the setpoint
    # daylight ~110 lm/W: the room's floor receives about its illuminance, walls and IR add half again
    solar_gain_w = 1.5 * daylight / 110.0 * cfg.floor_area_m2
    lamp_w = cfg.lamp_lux * cfg.floor_area_m2 / 60.0  # LEDs ~120 lm/W at 50 % utilisation
    setback = (hour < 6.0) | (hour >= 22.5)
    setpoint = cfg.heating_setpoint_c - cfg.night_setback_c * setback

    co2 = np.empty(n)
    temp = np.empty(n)
    water = np.empty(n)
    window = np.zeros(n, dtype=bool)
    c = OUTDOOR_CO2_PPM + (float(count[0]) * 400.0 if count[0] else rng.uniform(0, 150))
    temperature = float(setpoint[0] + rng.normal(0, 0.5))
    w = 0.45 * float(saturation_vapour_density(temperature))
    window_open_until = -1.0
    open_rate = cfg.window_opening / 1800.0  # per second, when the air is stale
    for i in range(n):
        # occupants open a window when CO₂ is high (or airing the bedroom in the morning)
        if window_open_until >= t[i]:
            window[i] = True
        elif present[i] and activity[i] != 1:
            stale = max(0.0, (c - 1000.0) / 800.0)
            if rng.random() < open_rate * dt * min(stale, 2.0) or (
                cfg.schedule == "bedroom"
                and activity[i - 1 if i else 0] == 1
                and rng.random() < cfg.window_opening
            ):
                window_open_until = t[i] + rng.uniform(300, 1800) * (0.5 if t_out[i] < 5 else 1.0)
                window[i] = True
        ach = cfg.ach + (cfg.window_ach if window[i] else 0.0)
        lam = ach / 3600.0  # 1/s
        q = lam * volume  # m³/s
        # CO₂ (ppm): exact exponential approach to equilibrium
        c_eq = OUTDOOR_CO2_PPM + co2_gen[i] / q * 1e6
        c = c_eq + (c - c_eq) * math.exp(-lam * dt)
        # heat: conductance to outside plus proportional heater, clipped to [0, max]
        g_out = ua + RHO_CP_AIR * q
        gains = heat_gen[i] + solar_gain_w[i] + (lamp_w if lamp[i] else 0.0)
        heat_demand = heater_gain * (setpoint[i] - temperature)
        if 0.0 < heat_demand < heater_max:
            g = g_out + heater_gain
            t_eq = (g_out * t_out[i] + gains + heater_gain * setpoint[i]) / g
        else:
            g = g_out
            t_eq = (g_out * t_out[i] + gains + (heater_max if heat_demand >= heater_max else 0.0)) / g
        temperature = t_eq + (temperature - t_eq) * math.exp(-g / capacity * dt)
        # water vapour (g/m³) with hygroscopic buffering
        lam_w = lam / cfg.moisture_buffer
        w_eq = w_out[i] + moist_gen[i] / q
        w = w_eq + (w - w_eq) * math.exp(-lam_w * dt)
        co2[i], temp[i], water[i] = c, temperature, w
    rh = np.clip(100.0 * water / saturation_vapour_density(temp), 0.0, 100.0)

    # sample at the output period (end of each period)
    idx = np.arange(n_out) * sub
    out_t = t[idx]
    k = cfg.sensor_noise
    # sensor: offset + slow drift + white noise, then quantised
    tt = (
        temp[idx]
        + rng.normal(0, 0.3) * k
        + _ar1(rng, n_out, period_s, DAY_S, 0.05 * k)
        + rng.normal(0, 0.08 * k, n_out)
    )
    hh = (
        rh[idx]
        + rng.normal(0, 1.5) * k
        + _ar1(rng, n_out, period_s, DAY_S, 0.5 * k)
        + rng.normal(0, 0.6 * k, n_out)
    )
    ll = illuminance_true[idx] * (1 + rng.normal(0, 0.03 * k, n_out)) + rng.normal(0, 0.5 * k, n_out)
    cc = co2[idx] * (1 + rng.normal(0, 0.015 * k)) + rng.normal(0, 10.0) * k
    cc = cc + _ar1(rng, n_out, period_s, 5 * DAY_S, 15.0 * k) + rng.normal(0, (8.0 + 0.01 * co2[idx]) * k)
    occupants = count[idx]
    return {
        "t": out_t,
        "temperature": np.round(tt, 2),
        "humidity": np.round(np.clip(hh, 0, 100), 1),
        "illuminance": np.round(np.clip(ll, 0, None)),
        "co2": np.round(np.clip(cc, 350, 10_000)),
        "occupants": occupants,
        "occupancy": (occupants > 0).astype(np.float64),
        "lamp": lamp[idx].astype(np.float64),
        "window": window[idx].astype(np.float64),
        "outdoor_temperature": np.round(t_out[idx], 2),
        "true_temperature": temp[idx],
        "true_humidity": rh[idx],
        "true_illuminance": illuminance_true[idx],
        "true_co2": co2[idx],
    }


def simulate_rooms(
    n_rooms: int, *, hours: float, period_s: float = 60.0, seed: int = 0
) -> list[tuple[RoomConfig, dict[str, np.ndarray]]]:
    """``n_rooms`` varied rooms (every schedule represented), each simulated for ``hours``."""
    rng = np.random.default_rng(seed)
    rooms = []
    for i in range(n_rooms):
        cfg = RoomConfig.random(rng, SCHEDULES[i % len(SCHEDULES)])
        rooms.append((cfg, simulate_room(cfg, hours=hours, period_s=period_s, seed=seed * 1000 + i)))
    return rooms
