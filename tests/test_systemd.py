"""The systemd units (systemd-analyze verify and security), the MemoryDenyWriteExecute
decision against the installed ONNX Runtime, and systemd/install.sh in dry-run/prefix mode."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
INSTALL = SYSTEMD / "install.sh"
EXEC = "/opt/edge-infer/venv/bin/edge-infer"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
MAX_EXPOSURE = 2.0


def _stage(tmp_path: Path, *, jetson: bool = False) -> Path:
    """Copies of the units whose ExecStart names an executable that exists.

    ``systemd-analyze verify`` insists the ExecStart binary exists; the real one only does
    after install.sh. Everything else in the units is tested exactly as shipped.
    """
    units = tmp_path / "units"
    units.mkdir()
    fake = tmp_path / "bin" / "edge-infer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    for name in ("edge-infer.service", "edge-infer@.service"):
        text = (SYSTEMD / name).read_text()
        assert EXEC in text
        (units / name).write_text(text.replace(EXEC, str(fake)))
        if jetson:
            (units / f"{name}.d").mkdir()
            shutil.copy(SYSTEMD / "jetson.conf", units / f"{name}.d" / "jetson.conf")
    return units


def _analyze(*args: str, unit_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = dict(os.environ)
    env.pop("SYSTEMD_UNIT_PATH", None)
    if unit_path is not None:
        env["SYSTEMD_UNIT_PATH"] = f"{unit_path}:"  # the trailing ':' keeps the default path too
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def _exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", output)
    assert match, output
    return float(match.group(1))


# ---------------------------------------------------------------------------- verify


@needs_analyze
@pytest.mark.parametrize("unit", ["edge-infer.service", "edge-infer@kitchen.service"])
def test_verify_without_warnings(tmp_path: Path, unit: str) -> None:
    units = _stage(tmp_path)
    result = _analyze("verify", str(units / unit))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd-analyze verify warned:\n{result.stderr}"


@needs_analyze
@pytest.mark.parametrize("unit", ["edge-infer.service", "edge-infer@kitchen.service"])
def test_verify_with_the_jetson_dropin(tmp_path: Path, unit: str) -> None:
    units = _stage(tmp_path, jetson=True)
    result = _analyze("verify", unit, unit_path=units)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd-analyze verify warned:\n{result.stderr}"


@needs_analyze
def test_verify_catches_a_broken_dropin(tmp_path: Path) -> None:
    """The drop-in really is read: a typo in it shows up on stderr."""
    units = _stage(tmp_path, jetson=True)
    conf = units / "edge-infer.service.d" / "jetson.conf"
    conf.write_text(conf.read_text() + "DevicePolicyy=closed\n")
    result = _analyze("verify", "edge-infer.service", unit_path=units)
    assert "DevicePolicyy" in result.stderr


# ---------------------------------------------------------------------------- security


@needs_analyze
@pytest.mark.parametrize("unit", ["edge-infer.service", "edge-infer@kitchen.service"])
def test_security_exposure(tmp_path: Path, unit: str) -> None:
    units = _stage(tmp_path)
    result = _analyze("security", "--offline=yes", str(units / unit))
    exposure = _exposure(result.stdout)
    print(f"{unit}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


@needs_analyze
def test_security_exposure_with_the_jetson_dropin(tmp_path: Path) -> None:
    units = _stage(tmp_path, jetson=True)
    result = _analyze("security", "--offline=yes", "edge-infer.service", unit_path=units)
    exposure = _exposure(result.stdout)
    print(f"edge-infer.service + jetson.conf: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert "/dev/nvmap:rw" in result.stdout, "the drop-in was not applied"


# ---------------------------------------------------------------------------- content


def _service_section(name: str) -> dict[str, list[str]]:
    """[Service] of a unit as key -> list of values (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_main_unit_settings() -> None:
    s = _service_section("edge-infer.service")
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"{EXEC} run -c /etc/edge-infer/config.yaml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["WatchdogSec"] == "30s"
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "edge-infer"
    assert one["ConfigurationDirectory"] == "edge-infer"
    assert one["ProtectSystem"] == "strict"
    assert one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert one["MemoryDenyWriteExecute"] == "yes"
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert s["SystemCallFilter"][0] == "@system-service"


def test_template_matches_the_main_unit() -> None:
    main = _service_section("edge-infer.service")
    tmpl = _service_section("edge-infer@.service")
    differs = {"ExecStart", "SyslogIdentifier", "CacheDirectory", "Environment"}
    assert {k: v for k, v in main.items() if k not in differs} == {
        k: v for k, v in tmpl.items() if k not in differs
    }
    assert tmpl["ExecStart"] == [f"{EXEC} run -c /etc/edge-infer/%i.yaml"]
    # The template adds the instance id of a cluster member (docs/scale-out.md) and nothing else.
    assert tmpl["Environment"] == [*main["Environment"], "EDGE_INFER_INSTANCE=%i"]


def test_jetson_dropin_opens_only_gpu_nodes() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = (SYSTEMD / "jetson.conf").read_text()
    parser.read_string(text)
    assert parser.get("Service", "DevicePolicy") == "closed"
    nodes = [ln.split("=", 1)[1].split()[0] for ln in text.splitlines() if ln.startswith("DeviceAllow=")]
    assert "/dev/nvmap" in nodes
    assert "/dev/nvhost-ctrl-gpu" in nodes
    assert "/dev/nvgpu/igpu0/ctrl" in nodes
    for node in nodes:
        assert re.fullmatch(r"/dev/(nvmap|nvhost-[a-z0-9-]+|nvgpu/igpu0/[a-z-]+|host1x-fence)", node), node
        assert not re.search(r"msenc|nvdec|nvjpg|vic|vi$|isp|dbg|ctxsw|display|dri", node), node


# ---------------------------------------------------------------------------- MemoryDenyWriteExecute

# Installs the seccomp filter systemd uses for MemoryDenyWriteExecute=yes (mmap with
# PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect with PROT_EXEC, shmat with SHM_EXEC all
# fail with EPERM), then runs an ONNX model through onnxruntime's CPU provider.
_MDWE_FILTER = textwrap.dedent(
    """
    import ctypes, ctypes.util, errno, mmap, sys

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
    deny = 0x00050000 | errno.EPERM     # SCMP_ACT_ERRNO(EPERM)
    MASKED_EQ, W, X, SHM_EXEC = 7, 2, 4, 0o100000
    for name, mask, value in [("mmap", W | X, W | X), ("mmap2", W | X, W | X),
                              ("mprotect", X, X), ("pkey_mprotect", X, X),
                              ("shmat", SHM_EXEC, SHM_EXEC)]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            rule = Cmp(2, MASKED_EQ, mask, value)
            assert lib.seccomp_rule_add_array(ctx, deny, nr, 1, ctypes.byref(rule)) == 0
    libc = ctypes.CDLL(None)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert lib.seccomp_load(ctx) == 0
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("filter not effective: W+X mapping allowed")
    except OSError:
        pass
    """
)
_MDWE_PROBE = _MDWE_FILTER + textwrap.dedent(
    """
    import numpy as np
    import onnxruntime as ort
    model = open(sys.argv[1], "rb").read()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    out = s.run(None, {"x": np.random.rand(64, 32).astype("float32")})[0]
    assert out.shape == (64, 8), out.shape
    print("ok", ort.__version__)
    """
)


def test_onnxruntime_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """Grounds MemoryDenyWriteExecute=yes in the unit: the installed onnxruntime loads and
    runs a model with the same seccomp filter systemd installs for that setting."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import ctypes.util

    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed")
    import numpy as np
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 8], np.random.rand(256).astype("float32").tolist())
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Softmax", ["r"], ["y"]),
        ],
        "mdwe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")


# SystemCallFilter=~@resources as systemd resolves it: setpriority, setrlimit/prlimit64 and the
# scheduler/NUMA calls fail with EPERM (learn's nice and its child's memory ceiling then fail too).
_RESOURCES_FILTER = textwrap.dedent(
    """
    ctx2 = lib.seccomp_init(0x7FFF0000)
    for name in ["ioprio_set", "mbind", "migrate_pages", "move_pages", "nice", "sched_setaffinity",
                 "sched_setattr", "sched_setparam", "sched_setscheduler", "set_mempolicy",
                 "set_mempolicy_home_node", "setpriority", "setrlimit", "prlimit64"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            assert lib.seccomp_rule_add_array(ctx2, deny, nr, 0, None) == 0
    assert lib.seccomp_load(ctx2) == 0
    """
)
_LEARN_RUN = textwrap.dedent(
    """
    import json, shutil
    from pathlib import Path
    import yaml
    from tests.test_learn_e2e import BUNDLED, config_data, history
    from edge.learn import run as learn_run
    from edge.learn.sources import MemorySource
    work = Path(sys.argv[1])
    shutil.copyfile(BUNDLED, work / "occupancy.onnx")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(work, {"train": {"epochs": 4}}), sort_keys=False))
    result = learn_run.learn(path, "rooms", source=MemorySource(history(), "simulated rooms"))
    print("learn", result.status, json.dumps(result.report.get("training")))
    """
)


def test_learn_trains_inside_the_units_sandbox(tmp_path: Path) -> None:
    """The daemon's Retrain runs `learn` as its own child, inside the unit's sandbox: with
    MemoryDenyWriteExecute=yes torch's oneDNN JIT cannot map code ("could not create a primitive"),
    and ~@resources denies learn's nice and its child's memory ceiling. Training still runs: the
    child turns oneDNN off when W+X memory is denied, the RSS watch still bounds it."""
    pytest.importorskip("torch")
    import ctypes.util

    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_FILTER + _RESOURCES_FILTER + _LEARN_RUN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
        cwd=ROOT,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "oneDNN kernels are off" in out, out[-3000:]
    status = next(line for line in result.stdout.splitlines() if line.startswith("learn "))
    assert status.split()[1] in ("0", "1"), out[-3000:]  # promoted or kept: the model was trained


# ---------------------------------------------------------------------------- install.sh


def _install(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=300, check=False
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_install_trainer_puts_a_cpu_torch_first_then_the_extra(tmp_path: Path) -> None:
    """--trainer: a CPU torch before the extra (a bare torch on x86_64 pulls CUDA), the extra on the
    project name of any --source spelling."""
    for source, want in (
        ("edge-infer==0.2.0", "edge-infer[trainer]==0.2.0"),
        ("/srv/edge-infer", "/srv/edge-infer[trainer]"),
    ):
        out = _install("--dry-run", "--trainer", "--source", source, "--prefix", str(tmp_path)).stdout
        pips = [line for line in out.splitlines() if " -m pip install " in line]
        assert len(pips) == 3, out  # pip itself, torch, the project with the extra
        if os.uname().machine == "x86_64":
            assert "--index-url https://download.pytorch.org/whl/cpu torch==2.9.1+cpu" in pips[1], pips
        else:
            assert pips[1].endswith("torch==2.9.1"), pips
        assert pips[2].endswith(" " + want), pips
    custom = _install("--dry-run", "--trainer", "--torch", "torch==2.13.0", "--prefix", str(tmp_path)).stdout
    assert any(line.endswith(" torch==2.13.0") for line in custom.splitlines()), custom
    plain = _install("--dry-run", "--prefix", str(tmp_path)).stdout
    assert "torch" not in plain and "[trainer]" not in plain, plain


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    result = _install("--dry-run", "--prefix", str(prefix), "--jetson")
    assert not prefix.exists(), "a dry run must not create anything"
    out = result.stdout
    assert f"+ python3 -m venv {prefix}/opt/edge-infer/venv" in out
    assert f"{prefix}/etc/edge-infer/config.yaml" in out
    assert f"{prefix}/etc/systemd/system/edge-infer.service.d/jetson.conf" in out
    assert "+ systemctl" not in out


def test_install_dry_run_on_the_real_root_plans_systemctl() -> None:
    result = _install("--dry-run", "--no-pip")
    assert "+ systemctl daemon-reload" in result.stdout
    assert "+ systemctl enable edge-infer.service" in result.stdout


def test_install_under_a_prefix_is_idempotent_and_keeps_the_config(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    _install("--prefix", str(prefix), "--no-pip")
    etc = prefix / "etc" / "edge-infer"
    units = prefix / "etc" / "systemd" / "system"
    assert (etc / "config.yaml").read_text() == (etc / "config.yaml.example").read_text()
    assert stat.S_IMODE((etc / "secrets").stat().st_mode) == 0o700
    assert (etc / "models").is_dir()
    assert (units / "edge-infer.service").read_text() == (SYSTEMD / "edge-infer.service").read_text()
    assert (units / "edge-infer@.service").read_text() == (SYSTEMD / "edge-infer@.service").read_text()
    assert not (units / "edge-infer.service.d").exists()

    # the example config is valid for the daemon
    from edge.config import load_config

    cfg = load_config(etc / "config.yaml")
    from edge import zoo

    # a bundled model that exists (it used to name models/appliance.onnx, which did not)
    assert cfg.models["appliance"].path == zoo.resolve("zoo:appliance").path
    assert cfg.models["appliance"].path.is_file()

    # the user edits the config; a unit was tampered with; run again
    (etc / "config.yaml").write_text("# mine\n")
    (units / "edge-infer.service").write_text("[Service]\n")
    second = _install("--prefix", str(prefix), "--no-pip", "--jetson")
    assert (etc / "config.yaml").read_text() == "# mine\n", "an upgrade keeps the user's config"
    assert "keeping existing" in second.stdout
    assert (units / "edge-infer.service").read_text() == (SYSTEMD / "edge-infer.service").read_text()
    for unit in ("edge-infer.service", "edge-infer@.service"):
        assert (units / f"{unit}.d" / "jetson.conf").read_text() == (SYSTEMD / "jetson.conf").read_text()

    third = _install("--prefix", str(prefix), "--no-pip", "--no-jetson")
    assert not (units / "edge-infer.service.d" / "jetson.conf").exists()
    assert "wrote" not in third.stdout, "nothing changed, nothing written"


def _elf64(exec_stack: bool) -> bytes:
    """A minimal little-endian ELF64 header with one PT_GNU_STACK program header."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    struct.pack_into("<HHI", header, 16, 3, 62, 1)  # ET_DYN, x86-64, version
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<II", phdr, 0, 0x6474E551, 6 | (1 if exec_stack else 0))
    return bytes(header + phdr)


def test_install_relaxes_mdwe_only_for_an_executable_stack(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    site = prefix / "opt" / "edge-infer" / "venv" / "lib" / "python3.11" / "site-packages" / "pkg"
    site.mkdir(parents=True)
    (site / "good.cpython-311-x86_64-linux-gnu.so").write_bytes(_elf64(False))
    _install("--prefix", str(prefix), "--no-pip")
    dropin = prefix / "etc" / "systemd" / "system" / "edge-infer.service.d" / "execstack.conf"
    assert not dropin.exists()

    bad = site / "libbad.so.1"
    bad.write_bytes(_elf64(True))
    result = _install("--prefix", str(prefix), "--no-pip")
    assert "need an executable stack" in result.stdout
    assert "MemoryDenyWriteExecute=no" in dropin.read_text()
    assert str(bad) in dropin.read_text()

    bad.unlink()
    _install("--prefix", str(prefix), "--no-pip")
    assert not dropin.exists(), "fixed libraries bring MemoryDenyWriteExecute=yes back"


def test_install_rejects_unknown_options() -> None:
    result = _install("--frobnicate", check=False)
    assert result.returncode == 2
    assert "unknown option" in result.stderr


def _fake_wheel(directory: Path) -> Path:
    """A stand-in distribution providing an ``edge-infer`` console script (pip installs a
    wheel offline without setuptools or wheel in the venv)."""
    import zipfile

    path = directory / "fakeedge-1.0-py3-none-any.whl"
    files = {
        "fakeedge/__init__.py": "def main():\n    print('fake edge-infer')\n",
        "fakeedge-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fakeedge\nVersion: 1.0\n",
        "fakeedge-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        "fakeedge-1.0.dist-info/entry_points.txt": "[console_scripts]\nedge-infer = fakeedge:main\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        record = "".join(f"{name},,\n" for name in files) + "fakeedge-1.0.dist-info/RECORD,,\n"
        z.writestr("fakeedge-1.0.dist-info/RECORD", record)
    return path


@pytest.mark.slow
@pytest.mark.install
def test_install_creates_and_upgrades_the_venv(tmp_path: Path) -> None:
    """The venv path for real, offline, with a stand-in wheel for edge-infer."""
    wheel = _fake_wheel(tmp_path)
    prefix = tmp_path / "root"
    offline = ["--pip-arg=--no-index", "--python", sys.executable]
    _install("--prefix", str(prefix), "--source", str(wheel), *offline)
    exe = prefix / "opt" / "edge-infer" / "venv" / "bin" / "edge-infer"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout == "fake edge-infer\n"
    assert list(
        (prefix / "opt" / "edge-infer" / "venv" / "lib").glob("python3*/site-packages/fakeedge/__pycache__")
    )
    again = _install("--prefix", str(prefix), "--source", str(wheel), *offline)
    assert "upgrading the existing virtual environment" in again.stdout


@pytest.mark.slow
@pytest.mark.install
@pytest.mark.broker
def test_install_then_the_units_exec_start_serves_predictions(tmp_path: Path, fresh_broker: Any) -> None:
    """The user's path: install.sh (this checkout, for real) into a root, `check` the config it
    wrote, then the daemon with exactly the unit's ExecStart and Environment= (prefix applied),
    working directory /, against a real Mosquitto: predictions for simulated Zigbee2MQTT plugs."""
    from tests.harness import Collector

    mosquitto = fresh_broker.start()  # its own: the simulator's retained topics stay in it
    prefix = tmp_path / "root"
    _install("--prefix", str(prefix), "--python", sys.executable)
    exe = prefix / "opt" / "edge-infer" / "venv" / "bin" / "edge-infer"
    config = prefix / "etc" / "edge-infer" / "config.yaml"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGE_INFER_MQTT_URL")}
    check = subprocess.run(
        [str(exe), "check", "-c", str(config)], capture_output=True, text=True, timeout=120, env=env, cwd="/"
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "zoo" in check.stdout or "appliance" in check.stdout

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((prefix / "etc" / "systemd" / "system" / "edge-infer.service").read_text())
    service = unit["Service"]
    argv = service["ExecStart"].split()
    argv = [str(prefix) + a if a.startswith(("/opt/", "/etc/")) else a for a in argv]
    assert argv[:2] == [str(exe), "run"]
    unit_env = dict(item.split("=", 1) for item in service["Environment"].split())
    state = prefix / "var" / "lib" / "edge-infer"
    state.mkdir(parents=True)
    run_env = {
        "PATH": os.environ["PATH"],
        **unit_env,
        "STATE_DIRECTORY": str(state),  # StateDirectory=edge-infer
        "EDGE_INFER_MQTT_URL": mosquitto.url,  # the one override: this test's broker
    }
    collector = Collector(mosquitto.url, "edge-infer/appliance/#")
    daemon = subprocess.Popen(
        argv, cwd="/", env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "simulate",
            "--mqtt-url",
            mosquitto.url,
            "--families",
            "z2m_plug",
            "--devices",
            "2",
            "--speed",
            "600",
            "--duration",
            "150",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        got = collector.wait(
            lambda ms: any(m.topic.count("/") == 2 and b'"label"' in m.payload for m in ms), timeout=150
        )
        answers = [m.json() for m in got if m.topic.count("/") == 2 and b'"label"' in m.payload]
        assert answers and answers[0]["model"] == "appliance"
        assert daemon.poll() is None
    finally:
        sim.terminate()
        daemon.terminate()
        out, _ = daemon.communicate(timeout=30)
        sim.communicate(timeout=30)
        collector.close()
    assert daemon.returncode == 0, out[-3000:]
