"""The YAML configuration, validated by pydantic.

Every model forbids unknown keys, so a typo is an error that names the key.
:func:`load_config` turns any problem into a :class:`ConfigError` whose message
starts with the dotted YAML key (``pipelines.kitchen.features.size``).
Secrets may come from a file or an environment variable and never appear in
``repr`` or logs.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from edge.decode import TopicPattern

ENV_MQTT_URL = "EDGE_INFER_MQTT_URL"
ENV_INSTANCE = "EDGE_INFER_INSTANCE"
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted YAML key it concerns."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")
        self.key = key
        self.message = message
        self.source = source


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


QoS = Literal[0, 1, 2]


class TlsConfig(_Model):
    """TLS for ``mqtts://`` connections. Certificate verification is on unless ``insecure``."""

    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate.")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(None, description="Client private key (mutual TLS).")
    insecure: bool = Field(False, description="Skip certificate and hostname verification (testing only).")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(_Model):
    """The broker connection."""

    url: str = Field("mqtt://localhost:1883", description="mqtt://host:port or mqtts://host:port.")
    username: str | None = Field(None, description="User name (may also be given in the URL).")
    password: SecretStr | None = Field(None, description="Password; prefer password_file or password_env.")
    password_file: Path | None = Field(None, description="File whose first line is the password.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    client_id: str | None = Field(None, description="Stable client id; default edge-infer-<hostname>.")
    keepalive: int = Field(30, ge=5, le=65535, description="Seconds between pings; detects dead links.")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    tls: TlsConfig | None = Field(None, description="TLS options (used with mqtts://).")
    base_topic: str = Field("edge-infer", description="Root of status, bridge info and default outputs.")
    persistent_session: bool = Field(
        True, description="Keep the broker session (QoS 1 messages queue while the daemon restarts)."
    )
    session_expiry_s: int = Field(86400, ge=0, description="MQTT 5 session expiry interval.")
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles up to the max.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest reconnect delay.")
    publish_queue: int = Field(10000, ge=1, description="Outputs held while the broker is away.")
    publish_queue_policy: Literal["drop_oldest", "drop_newest"] = Field(
        "drop_oldest", description="Which output to drop when the queue is full."
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_str(cls, value: Any) -> Any:
        if isinstance(value, int | float):
            return {5: "5", 3.11: "3.1.1", 4: "3.1.1", 311: "3.1.1"}.get(value, str(value))
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"scheme {parts.scheme!r} is not mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in {value!r}: {exc}") from None
        return value

    @field_validator("base_topic")
    @classmethod
    def _base_topic(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\0") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a plain topic without wildcards or leading/trailing '/'")
        return value

    @model_validator(mode="after")
    def _secrets(self) -> MqttConfig:
        given = [n for n in ("password", "password_file", "password_env") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of {', '.join(given)}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None
        return host

    @property
    def tls_enabled(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if self.tls_enabled else 1883)

    def resolved_username(self) -> str | None:
        url_user = urlsplit(self.url).username
        return self.username or (unquote(url_user) if url_user else None)

    def resolved_password(self) -> str | None:
        """The password from wherever it is configured. Reads files and env at call time."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError("mqtt.password_file", f"cannot read a password from it: {exc}") from None
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError("mqtt.password_env", f"environment variable {self.password_env} is not set")
            return value
        url_pw = urlsplit(self.url).password
        return unquote(url_pw) if url_pw else None

    def resolved_client_id(self) -> str:
        return self.client_id or f"edge-infer-{socket.gethostname()}"


class RuntimeConfig(_Model):
    """ONNX Runtime defaults for every model (a model may override them)."""

    providers: list[str] | Literal["auto"] = Field(
        "auto", description="'auto' (TensorRT, CUDA, CPU as available) or an explicit list; CPU is appended."
    )
    intra_op_threads: int = Field(1, ge=0, description="Threads inside one operator (0 = ORT default).")
    inter_op_threads: int = Field(1, ge=0, description="Threads across operators (0 = ORT default).")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    trt_cache_dir: Path | None = Field(None, description="TensorRT engine cache directory.")
    trt_fp16: bool = Field(False, description="Let TensorRT run in fp16.")


class ModelConfig(_Model):
    """One ONNX model. Manifest values (labels, features, threshold) can be overridden here."""

    path: Path = Field(description="ONNX file, relative to the config file's directory.")
    sha256: str | None = Field(None, description="Refuse the file unless its sha256 matches.")
    providers: list[str] | Literal["auto"] | None = None
    intra_op_threads: int | None = Field(None, ge=0)
    max_batch: int = Field(64, ge=1, le=4096, description="Largest batch one inference call takes.")
    max_delay_ms: float = Field(
        2.0, ge=0, description="How long a partial batch may wait for more while messages keep arriving."
    )
    labels: list[str] | None = Field(None, description="Override the manifest's class labels.")
    features: list[str] | None = Field(None, description="Override the manifest's feature names.")
    window: int | None = Field(None, ge=1, description="Override the manifest's window length.")
    threshold: float | None = Field(None, description="Override the manifest's anomaly threshold.")
    task: Literal["classification", "regression", "anomaly"] | None = None
    unit: str | None = None

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and (
            len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())
        ):
            raise ValueError("must be 64 hexadecimal digits")
        return value.lower() if value else value


class SourceConfig(_Model):
    """Where a pipeline's readings come from."""

    profile: str = Field("json", description="Device family: json, zigbee2mqtt, tasmota, shelly, ...")
    topics: list[str] = Field(default_factory=list, description="Topic patterns; {device} names a segment.")
    device_field: str | None = Field(None, description="Payload field with the device id (json profile).")
    timestamp_field: str | None = Field(None, description="Payload field with the sample time.")
    format: Literal["json", "plain"] = Field("json", description="Payload format (json profile).")
    availability_topic: str | None = Field(None, description="Topic pattern of the device's availability.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Profile options (see docs/devices.md)."
    )
    qos: QoS = Field(1, description="Subscription QoS.")
    shared_group: str | None = Field(
        None, description="Subscribe through $share/<group>/ so several daemons split the messages."
    )

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        for topic in value:
            TopicPattern(topic)
        return value


class SnapshotFeatures(_Model):
    """Join the latest value of each reading of a device; predict when all are fresh."""

    type: Literal["snapshot"] = "snapshot"
    max_age_s: float = Field(300.0, gt=0, description="A reading older than this is stale.")


class WindowFeatures(_Model):
    """A per-device sliding window of the last N samples of each channel."""

    type: Literal["window"] = "window"
    size: int | None = Field(None, ge=1, description="Samples per window (default: the model's).")
    hop: int = Field(1, ge=1, description="Predict every `hop` new samples.")
    resample_period_s: float | None = Field(
        None, gt=0, description="Resample to this fixed period (sample and hold) before windowing."
    )
    max_gap_s: float | None = Field(
        None, gt=0, description="A silence longer than this restarts the device's window."
    )


Features = Annotated[SnapshotFeatures | WindowFeatures, Field(discriminator="type")]


class OutputConfig(_Model):
    """Where and when a pipeline publishes."""

    topic: str = Field("{base}/{pipeline}/{device}", description="Template: {base}, {pipeline}, {device}.")
    qos: QoS = 0
    retain: bool = False
    publish: Literal["always", "on_change"] = Field(
        "always", description="Every prediction, or only when the label/value changes."
    )
    min_interval_s: float = Field(0.0, ge=0, description="At most one publish per device this often.")
    heartbeat_s: float | None = Field(
        None, gt=0, description="With on_change: republish at least this often."
    )
    change_delta: float = Field(
        0.0, ge=0, description="Regression/anomaly: a change smaller than this is none."
    )
    debounce: int = Field(1, ge=1, description="A new label must win this many predictions in a row.")
    min_confidence: float = Field(0.0, ge=0, le=1, description="Below it the label is null.")
    top_k: int = Field(3, ge=0, description="Alternatives with probabilities in the output.")

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if "+" in value or "#" in value:
            raise ValueError("an output topic cannot contain wildcards")
        for part in value.replace("{base}", "").replace("{pipeline}", "").replace("{device}", ""):
            if part in "{}":
                raise ValueError("only {base}, {pipeline} and {device} may be used")
        return value


class EntityConfig(_Model):
    """How a pipeline's output appears in Home Assistant (defaults come from the model)."""

    enabled: bool = Field(True, description="Announce this pipeline's outputs through discovery.")
    name: str | None = Field(None, description="Entity name; default: the pipeline name.")
    device_class: str | None = Field(None, description="Home Assistant device class, e.g. occupancy, power.")
    state_class: str | None = Field(None, description="measurement, total, total_increasing.")
    binary_on: str | None = Field(
        None, description="Show a classification as a binary_sensor that is on for this label."
    )
    unit: str | None = Field(None, description="Unit of a regression value (default: the model's).")
    icon: str | None = Field(None, description="mdi: icon.")


class PipelineConfig(_Model):
    """Source topics -> decode -> features -> model -> post-process -> output topic."""

    model: str = Field(description="Name of an entry under `models`.")
    source: SourceConfig
    inputs: dict[str, str] | None = Field(
        None, description="Model feature name -> reading (name or field path); default: the same names."
    )
    features: Features = Field(default_factory=SnapshotFeatures)
    output: OutputConfig = Field(default_factory=OutputConfig)
    max_devices: int = Field(1000, ge=1, description="Devices tracked at most; more are dropped and counted.")
    devices: list[str] | None = Field(None, description="Only these device ids (default: any).")
    enabled: bool = True
    homeassistant: EntityConfig = Field(default_factory=EntityConfig)
    scale_out: Literal["auto", "shared", "partition"] = Field(
        "auto",
        description="With cluster.enabled: 'shared' (MQTT 5 shared subscription, stateless), "
        "'partition' (each instance owns a hash share of the devices), 'auto' (window: partition, "
        "snapshot: shared). See docs/scale-out.md.",
    )


class DeadLetterConfig(_Model):
    """Rejected messages forwarded, with the reason, to a topic of their own."""

    enabled: bool = Field(False, description="Forward rejected messages with the reason.")
    topic: str = Field("{base}/dead_letter/{pipeline}", description="Template: {base}, {pipeline}.")
    max_per_s: float = Field(10.0, gt=0, description="Rate limit of dead-letter publishes.")


class LimitsConfig(_Model):
    """Bounds that protect memory from floods and oversized payloads."""

    max_payload_bytes: int = Field(65536, ge=16, description="Larger payloads are dropped (oversized).")
    max_window_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Memory for all windows together.")
    max_clock_skew_s: float = Field(
        86400.0,
        gt=0,
        description="Sample times more than this ahead of the receive time, or before 2000, are dropped "
        "(bad_timestamp).",
    )
    max_queued_inputs: int = Field(
        1000,
        ge=1,
        description="Rows waiting for one model beyond which the daemon stops reading the broker until "
        "half have been answered (back-pressure; QoS 1 inputs wait in the broker meanwhile).",
    )


class HomeAssistantConfig(_Model):
    """Home Assistant MQTT discovery (see docs/homeassistant.md)."""

    enabled: bool = Field(True, description="Publish MQTT discovery so predictions appear as entities.")
    discovery_prefix: str = "homeassistant"
    status_topic: str = Field("homeassistant/status", description="Home Assistant's birth/will topic.")
    instance_id: str = Field(
        "default",
        description="Names this daemon's bridge device; give each instance its own when scaling out.",
    )


class ClusterConfig(_Model):
    """Several instances sharing the load through the broker (see docs/scale-out.md)."""

    enabled: bool = Field(False, description="Run as one member of a group of instances.")
    instance: str | None = Field(
        None,
        description="This instance's id ([A-Za-z0-9_-]); default: --instance, $EDGE_INFER_INSTANCE, "
        "else the host name. Status moves to <base>/instances/<id>/.",
    )
    members: list[str] | None = Field(
        None,
        description="Static member set for partition pipelines; default: discovered from the "
        "retained <base>/instances/+/status topics.",
    )
    shared_group: str = Field(
        "edge-infer", description="$share group of shared pipelines (a source's shared_group wins)."
    )

    @field_validator("instance")
    @classmethod
    def _instance(cls, value: str | None) -> str | None:
        if value is not None and not _INSTANCE_ID.match(value):
            raise ValueError("must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
        return value

    @field_validator("members")
    @classmethod
    def _members(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one member, or leave it out for discovery")
            for member in value:
                if not _INSTANCE_ID.match(member):
                    raise ValueError(f"member {member!r}: 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
            if len(set(value)) != len(value):
                raise ValueError("a member is listed twice")
        return value

    @field_validator("shared_group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not value or any(c in value for c in "/+#\0"):
            raise ValueError("a share group name cannot be empty or contain '/', '+' or '#'")
        return value

    def resolved_instance(self) -> str:
        """The instance id: configured, else the host name made into a valid id."""
        if self.instance:
            return self.instance
        host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-")[:64]
        return host or "edge-infer"


class MetricsConfig(_Model):
    """The optional HTTP listener with /metrics (Prometheus) and /healthz."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9109, ge=0, le=65535)


class ReloadConfig(_Model):
    """Live reload: SIGHUP always reloads; model files can also be watched."""

    watch_models: bool = Field(True, description="Reload when a model file changes (atomically replaced).")
    interval_s: float = Field(2.0, gt=0, description="How often model files are checked.")


class StateConfig(_Model):
    """The optional state file: per-device windows and joins survive a daemon restart."""

    file: Path | None = Field(
        None,
        description="Where windows are kept across restarts (relative to the config file); "
        "unset: they start empty after a restart. systemd: /var/lib/edge-infer/state.json.",
    )
    interval_s: float = Field(60.0, gt=0, description="How often it is written; also at every clean stop.")


class Config(_Model):
    """The whole configuration file."""

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models: dict[str, ModelConfig]
    pipelines: dict[str, PipelineConfig]
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    dead_letter: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    reload: ReloadConfig = Field(default_factory=ReloadConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    bridge_info_interval_s: float = Field(60.0, gt=0, description="How often bridge/info is refreshed.")
    shutdown_timeout_s: float = Field(5.0, gt=0, description="Bound on the flush at shutdown.")
    log_interval_s: float = Field(60.0, gt=0, description="Repeated problems are logged at most this often.")
    watchdog_stall_s: float = Field(
        30.0, gt=0, description="An inference call running longer stops the systemd watchdog pings."
    )
    status_interval_s: float = Field(10.0, gt=0, description="How often the systemd STATUS line is updated.")

    @model_validator(mode="after")
    def _references(self) -> Config:
        if not self.pipelines:
            raise _KeyedError("pipelines", "at least one pipeline is needed")
        for name, pipeline in self.pipelines.items():
            if pipeline.model not in self.models:
                known = ", ".join(sorted(self.models)) or "none"
                raise _KeyedError(f"pipelines.{name}.model", f"no model {pipeline.model!r} (models: {known})")
            if any(c in name for c in "/+#") or not name:
                raise _KeyedError(f"pipelines.{name}", "a pipeline name cannot contain '/', '+' or '#'")
        cluster = self.cluster
        if cluster.enabled:
            instance = cluster.resolved_instance()
            if cluster.members is not None and instance not in cluster.members:
                raise _KeyedError(
                    "cluster.members", f"this instance ({instance!r}) is not one of {cluster.members}"
                )
            if instance == self.homeassistant.instance_id:
                raise _KeyedError(
                    "cluster.instance",
                    f"{instance!r} is homeassistant.instance_id, which names the shared entities; "
                    "give the instance another id",
                )
        return self

    def scale_out(self, pipeline: str) -> Literal["none", "shared", "partition"]:
        """How a pipeline is spread over the instances: 'none' outside a cluster."""
        cfg = self.pipelines[pipeline]
        if not self.cluster.enabled:
            return "none"
        if cfg.scale_out != "auto":
            return cfg.scale_out
        return "partition" if isinstance(cfg.features, WindowFeatures) else "shared"

    def instance_mqtt(self) -> MqttConfig:
        """The connection settings of this instance: in a cluster the client id names the instance.

        ``{instance}`` in ``mqtt.client_id`` is replaced by the instance id; without a client id a
        cluster member connects as ``edge-infer-<hostname>-<instance>``.
        """
        mqtt = self.mqtt
        if not self.cluster.enabled:
            return mqtt
        instance = self.cluster.resolved_instance()
        if mqtt.client_id:
            client_id = mqtt.client_id.replace("{instance}", instance)
        else:
            client_id = f"edge-infer-{socket.gethostname()}-{instance}"
        return mqtt.model_copy(update={"client_id": client_id})


class _KeyedError(ValueError):
    """Raised inside validators when the key is not where pydantic would point."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def dotted_key(parts: list[str]) -> str:
    """``pipelines.room.source.topics.0``; a key that is not a plain name is quoted so the
    path stays unambiguous: ``pipelines['a.b'].model``."""
    out = ""
    for part in parts:
        if _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _format_validation(exc: ValidationError, source: str) -> ConfigError:
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    # Drop discriminated-union tags pydantic inserts ("window", "snapshot") after "features".
    cleaned: list[str] = []
    for index, part in enumerate(loc):
        if index > 0 and loc[index - 1] == "features" and part in ("window", "snapshot"):
            continue
        cleaned.append(part)
    key = dotted_key(cleaned)
    ctx = first.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _KeyedError):
        return ConfigError(inner.key, inner.message, source)
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check its spelling; see docs/configuration.md)"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if first["type"] != "missing" and "input" in first and not isinstance(first["input"], dict | list):
        shown = first["input"]
        if "password" not in key:
            message += f" (got {shown!r})"
    extra = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return ConfigError(key, message + extra, source)


def parse_config(data: Any, source: str = "config", base_dir: Path | None = None) -> Config:
    """Validate a parsed YAML document; relative model paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError("", "the file must be a YAML mapping with 'models' and 'pipelines'", source)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise _format_validation(exc, source) from None
    if base_dir is not None:
        models = {
            name: m.model_copy(update={"path": m.path if m.path.is_absolute() else base_dir / m.path})
            for name, m in config.models.items()
        }
        config = config.model_copy(update={"models": models})
        state = config.state.file
        if state is not None and not state.is_absolute():
            moved = config.state.model_copy(update={"file": base_dir / state})
            config = config.model_copy(update={"state": moved})
    return config


def load_config(path: str | Path, mqtt_url: str | None = None, instance: str | None = None) -> Config:
    """Read, validate and apply the overrides: the broker URL (argument, else
    ``EDGE_INFER_MQTT_URL``) and the cluster instance id (argument, else ``EDGE_INFER_INSTANCE``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read the config file: {exc.strerror}", str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", str(path)) from None
    url = mqtt_url or os.environ.get(ENV_MQTT_URL)
    if url and isinstance(data, dict):
        mqtt = dict(data.get("mqtt") or {})
        mqtt["url"] = url
        data["mqtt"] = mqtt
    instance = instance or os.environ.get(ENV_INSTANCE)
    if instance and isinstance(data, dict):
        cluster = data.get("cluster")
        cluster = dict(cluster) if isinstance(cluster, dict) else {}
        cluster["instance"] = instance
        data["cluster"] = cluster
    return parse_config(data, str(path), path.resolve().parent)


def config_warnings(config: Config, path: Path | None = None) -> list[str]:
    """Things that work but should not be: plaintext credentials, world-readable secrets."""
    warnings: list[str] = []
    mqtt = config.mqtt
    has_credentials = mqtt.resolved_username() is not None or any(
        getattr(mqtt, n) is not None for n in ("password", "password_file", "password_env")
    )
    loopback = mqtt.host in ("localhost", "127.0.0.1", "::1") or mqtt.host.startswith("127.")
    if has_credentials and not mqtt.tls_enabled and not loopback:
        warnings.append(
            f"mqtt.url: credentials will cross the network to {mqtt.host} in plain text; use mqtts://"
        )
    if mqtt.tls is not None and mqtt.tls.insecure:
        warnings.append("mqtt.tls.insecure: certificate verification is off")
    if mqtt.tls is not None and not mqtt.tls_enabled:
        warnings.append("mqtt.tls: ignored because mqtt.url is not mqtts://")
    candidates: list[tuple[str, Path]] = []
    if path is not None and mqtt.password is not None:
        candidates.append(("mqtt.password", path))
    if mqtt.password_file is not None:
        candidates.append(("mqtt.password_file", mqtt.password_file))
    for key, file in candidates:
        try:
            mode = file.stat().st_mode
        except OSError:
            continue
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.append(f"{key}: {file} holds a password and is readable by other users (chmod 600)")
    return warnings
