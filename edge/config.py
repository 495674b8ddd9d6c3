"""The YAML configuration, validated by pydantic.

Every model forbids unknown keys, so a typo is an error that names the key.
:func:`load_config` turns any problem into a :class:`ConfigError` whose message
starts with the dotted YAML key (``pipelines.kitchen.features.size``).
Secrets may come from a file or an environment variable and never appear in
``repr`` or logs.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge import zoo
from edge.decode import TopicPattern

ENV_MQTT_URL = "EDGE_INFER_MQTT_URL"
ENV_INSTANCE = "EDGE_INFER_INSTANCE"
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Bounds on what is read at start-up (docs/operations.md, "Start-up checks").
MAX_CONFIG_BYTES = 1 << 20  # a config file larger than 1 MiB is refused unread
MAX_SECRET_BYTES = 64 * 1024  # password files
MAX_YAML_DEPTH = 64  # nesting of mappings and sequences
MAX_YAML_ALIASES = 100  # '*alias' references in one file
MAX_YAML_NODES = 100_000  # values after aliases are expanded
MAX_INT_DIGITS = 40  # an integer with more digits is refused
MAX_MESSAGE_CHARS = 2000  # a config error message is cut here
MQTT_STRING_BYTES = 65535  # an MQTT UTF-8 string (client id, user name, topic)
# Topics the daemon builds append to mqtt.base_topic (instances/<id>/bridge/info, pipeline and
# device segments): the base may take at most this much of the 65,535 bytes.
MAX_BASE_TOPIC_BYTES = 32768
SESSION_EXPIRY_MAX = 2**32 - 1


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every message that shows a URL)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        password = None
        parts = None
    if parts is not None and password is not None:
        user, _, rest = parts.netloc.rpartition("@")
        name = user.split(":", 1)[0]
        return urlunsplit((parts.scheme, f"{name}:***@{rest}", parts.path, parts.query, parts.fragment))
    # Not parseable (a bad port, say): mask anything between '//' and the last '@'.
    return re.sub(r"(//[^/@:]*):[^/]*@", r"\1:***@", url)


def _mqtt_string(value: str, what: str, limit: int = MQTT_STRING_BYTES) -> str:
    """MQTT UTF-8 strings: at most ``limit`` bytes, no NUL, no C0/C1 controls, no surrogates or
    non-characters (Mosquitto disconnects a client that sends them)."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 (a lone surrogate)") from None
    if size > limit:
        raise ValueError(f"{what} is {size} bytes of UTF-8; MQTT allows at most {limit}")
    for index, char in enumerate(value):
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            raise ValueError(f"{what} contains the control character U+{code:04X} at position {index}")
        if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            raise ValueError(f"{what} contains the non-character U+{code:04X} at position {index}")
    return value


def read_limited(path: Path, key: str, limit: int, what: str) -> bytes:
    """Read a regular file of at most ``limit`` bytes; anything else is a ConfigError on ``key``.

    Special files (``/dev/zero``, FIFOs, devices) are refused before reading, and the read stops
    after ``limit + 1`` bytes whatever the file claims its size is (``/proc`` files say 0).
    """
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(key, f"{path} is not a regular file")
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError(key, f"{path} is larger than {limit} bytes; is it the right file?")
    return data


def _identity_hash(identity: str) -> str:
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:8]


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
    client_id: str | None = Field(
        None,
        description="Stable client id; default edge-infer-<hostname>-<8 hex digits of the config's "
        "absolute path and base_topic> (docs/operations.md).",
    )
    keepalive: int = Field(30, ge=5, le=65535, description="Seconds between pings; detects dead links.")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    tls: TlsConfig | None = Field(None, description="TLS options (used with mqtts://).")
    base_topic: str = Field("edge-infer", description="Root of status, bridge info and default outputs.")
    persistent_session: bool = Field(
        True, description="Keep the broker session (QoS 1 messages queue while the daemon restarts)."
    )
    session_expiry_s: int = Field(
        86400, ge=0, le=SESSION_EXPIRY_MAX, description="MQTT 5 session expiry interval (at most 2^32-1)."
    )
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
        shown = mask_url(value)[:200]
        try:
            parts = urlsplit(value)
        except ValueError as exc:
            raise ValueError(f"{shown!r} is not a URL: {exc}") from None
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"scheme {parts.scheme[:20]!r} is not mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"{shown!r} has no host")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"bad port in {shown!r}: give a number 0-65535") from None
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str | None) -> str | None:
        if not value:
            return None  # empty: the default, as before
        return _mqtt_string(value, "the client id")

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        return None if value is None else _mqtt_string(value, "the user name")

    @field_validator("base_topic")
    @classmethod
    def _base_topic(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\0") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a plain topic without wildcards or leading/trailing '/'")
        return _mqtt_string(value, "the base topic", MAX_BASE_TOPIC_BYTES)

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
        """The password from wherever it is configured. Reads files and env at call time;
        a problem is a ConfigError naming the key (never the value)."""
        if self.password is not None:
            return self._checked_password(self.password.get_secret_value(), "mqtt.password")
        if self.password_file is not None:
            data = read_limited(
                self.password_file, "mqtt.password_file", MAX_SECRET_BYTES, "the password file"
            )
            try:
                lines = data.decode("utf-8").splitlines()
            except UnicodeDecodeError:
                raise ConfigError("mqtt.password_file", f"{self.password_file} is not UTF-8 text") from None
            if not lines or not lines[0].strip():
                raise ConfigError("mqtt.password_file", f"{self.password_file}: the first line is empty")
            return self._checked_password(lines[0].strip(), "mqtt.password_file")
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError("mqtt.password_env", f"environment variable {self.password_env} is not set")
            return self._checked_password(value, "mqtt.password_env")
        url_pw = urlsplit(self.url).password
        return unquote(url_pw) if url_pw else None

    @staticmethod
    def _checked_password(value: str, key: str) -> str:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MQTT_STRING_BYTES:
            raise ConfigError(key, f"the password is {size} bytes; MQTT allows at most {MQTT_STRING_BYTES}")
        return value

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
    cpu_mem_arena: bool = Field(
        True,
        description="ONNX Runtime's CPU memory arena: keeps the largest batch's activations for the "
        "next call. Off: ~9 MB less peak RSS with examples/home.yaml, same answers, but a CNN's "
        "full batches several times slower (docs/performance.md, Memory).",
    )


class ModelConfig(_Model):
    """One ONNX model. Manifest values (labels, features, threshold) can be overridden here."""

    path: Path = Field(
        description="ONNX file, relative to the config file's directory; zoo:NAME[.fp32|.int8] (bundled)."
    )
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
    task: Literal["classification", "regression", "anomaly"] | None = Field(
        None, description="What the model predicts; required when the file has no edge-infer manifest."
    )
    unit: str | None = None

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and (
            len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())
        ):
            raise ValueError("must be 64 hexadecimal digits")
        return value.lower() if value else value


def _topic_literal(text: str, what: str, *, allow_slash: bool = True) -> str:
    """A topic prefix (or, without ``allow_slash``, one segment) with no wildcard, brace or
    empty level: the families put it into their subscriptions as it is."""
    if not text or any(ch in text for ch in "+#\0{}") or (not allow_slash and "/" in text):
        raise ValueError(
            f"{what}: {text!r} must be a non-empty topic "
            f"{'prefix' if allow_slash else 'segment'} without wildcards or braces"
        )
    if text.startswith("/") or text.endswith("/") or "//" in text:
        raise ValueError(f"{what}: {text!r} has an empty topic level")
    return text


class _SourceBase(_Model):
    """What every family's source has: the family, the subscription's QoS and shared group."""

    profile: str = Field(description="Device family (see docs/devices.md).")
    qos: QoS = Field(1, description="Subscription QoS.")
    shared_group: str | None = Field(
        None, description="Subscribe through $share/<group>/ so several daemons split the messages."
    )


JSON_SOURCE_KEYS = ("topics", "device_field", "timestamp_field", "format", "availability_topic")


class JsonSource(_SourceBase):
    """``profile: json`` (the default): JSON or plain-number payloads on topics you name."""

    profile: Literal["json"] = Field("json", description="Device family (see docs/devices.md).")
    topics: list[str] = Field(default_factory=list, description="Topic patterns; {device} names a segment.")
    device_field: str | None = Field(None, description="Payload field with the device id.")
    timestamp_field: str | None = Field(None, description="Payload field with the sample time.")
    format: Literal["json", "plain"] = Field("json", description="Payload format.")
    availability_topic: str | None = Field(None, description="Topic pattern of the device's availability.")

    @model_validator(mode="before")
    @classmethod
    def _no_options(cls, data: Any) -> Any:
        # The json profile is configured by the source's own keys; an option would be ignored.
        options = data.get("options") if isinstance(data, dict) else None
        if options is not None:
            key = next(iter(options), "") if isinstance(options, dict) and options else ""
            raise _KeyedError(
                f"options.{key}" if key and _PLAIN_KEY.fullmatch(str(key)) else "options",
                f"unknown option {str(key)[:80]!r} for the json profile, which takes none; give its "
                "settings as source keys: " + ", ".join(JSON_SOURCE_KEYS),
            )
        return data

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        for topic in value:
            TopicPattern(topic)
        return value

    def family_options(self) -> dict[str, Any]:
        """The options :func:`edge.families.build_decoder` takes for this source."""
        return {key: getattr(self, key) for key in JSON_SOURCE_KEYS}


class FamilyOptions(_Model):
    """Options every device family (other than json) takes."""

    family: ClassVar[str] = ""
    devices: list[str] | None = Field(None, description="Only these device ids (a non-empty list).")

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
            raise ValueError(f"option 'devices' of profile {cls.family!r} must be a non-empty list of ids")
        for dev in value:
            if not isinstance(dev, str) or not dev:
                raise ValueError(f"option 'devices' of profile {cls.family!r}: {dev!r} is not a device id")
            _topic_literal(dev, f"option 'devices' of profile {cls.family!r}", allow_slash=False)
        return list(value)

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key in data:
            if key not in cls.model_fields:
                raise _KeyedError(
                    str(key) if _PLAIN_KEY.fullmatch(str(key)) else "",
                    unknown_option_message(cls.family, str(key)),
                )
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _prefix(cls, value: Any, info: ValidationInfo) -> Any:
        """A topic prefix option: a string (a number is taken as its text), no wildcards."""
        field = cls.model_fields.get(info.field_name or "")
        extra = field.json_schema_extra if field is not None else None
        if value is None or not isinstance(extra, dict) or not extra.get("prefix"):
            return value
        what = f"option {info.field_name!r} of profile {cls.family!r}"
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(f"{what} must be a string, not {value!r}")
        return _topic_literal(str(value), what)


def _prefix_option(default: str | None, description: str, *, device: bool = False) -> Any:
    """A topic prefix option; with ``device``, when unset its topic segment is the device id."""
    return Field(default, description=description, json_schema_extra={"prefix": True, "device": device})


class Zigbee2MqttOptions(FamilyOptions):
    family: ClassVar[str] = "zigbee2mqtt"
    base_topic: str = _prefix_option("zigbee2mqtt", "Zigbee2MQTT's mqtt.base_topic.")


class TasmotaOptions(FamilyOptions):
    family: ClassVar[str] = "tasmota"
    tele_prefix: str = _prefix_option("tele", "The %prefix% for telemetry (Tasmota's Prefix3).")


class EsphomeOptions(FamilyOptions):
    family: ClassVar[str] = "esphome"
    prefix: str | None = _prefix_option(
        None, "The node's topic_prefix; unset: any node, device = prefix.", device=True
    )


class ShellyOptions(FamilyOptions):
    family: ClassVar[str] = "shelly"
    prefix: str | None = _prefix_option(
        None, "The MQTT topic prefix; unset: any device, device = prefix.", device=True
    )
    component: str = Field(
        "switch:0", description="Component the aliases refer to (switch:N, pm1:N, cover:N, em1:N)."
    )

    @field_validator("component", mode="before")
    @classmethod
    def _component(cls, value: Any) -> Any:
        if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_]+(?::\d+)?", value):
            raise ValueError(f"option 'component' of profile 'shelly': {value!r} is not like 'switch:0'")
        return value


class StatestreamOptions(FamilyOptions):
    family: ClassVar[str] = "statestream"
    base_topic: str = _prefix_option("homeassistant", "mqtt_statestream's base_topic.")
    domains: list[str] | None = Field(
        None, description="Per-entity readings: only these domains (a list), e.g. [sensor]."
    )
    device: str | None = Field(
        None, description="Device id for readings of specific entities (default: the first entity)."
    )

    @field_validator("domains", mode="before")
    @classmethod
    def _domains(cls, value: Any) -> Any:
        if value is not None and (
            isinstance(value, str)
            or not isinstance(value, list | tuple)
            or not all(isinstance(d, str) and d for d in value)
        ):
            raise ValueError("option 'domains' of profile 'statestream' must be a list of domains")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"option 'device' of profile 'statestream' must be a device id, not {value!r}")
        return value


class JsonOptions(FamilyOptions):
    """The json family's settings as :func:`edge.families.build_decoder` takes them (a config
    gives them as source keys, see :class:`JsonSource`)."""

    family: ClassVar[str] = "json"
    topics: list[str] | None = Field(None, description="A topic pattern or a list of them (required).")
    device_field: str | None = Field(None, description="Payload field with the device id.")
    timestamp_field: str | None = Field(None, description="Payload field with the sample time.")
    format: Literal["json", "plain"] = Field("json", description="Payload format.")
    availability_topic: str | None = Field(None, description="Topic pattern with online/offline payloads.")

    @field_validator("topics", mode="before")
    @classmethod
    def _topics(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if (
            not value
            or not isinstance(value, list | tuple)
            or not all(isinstance(t, str) and t for t in value)
        ):
            raise ValueError("profile 'json' needs option 'topics': a topic pattern or a list of them")
        return list(value)

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if value is None:
            return "json"
        if value not in ("json", "plain"):
            raise ValueError(f"option 'format' of profile 'json' must be json or plain, not {value!r}")
        return value


FAMILY_OPTIONS: dict[str, type[FamilyOptions]] = {
    o.family: o
    for o in (
        JsonOptions,
        Zigbee2MqttOptions,
        TasmotaOptions,
        EsphomeOptions,
        ShellyOptions,
        StatestreamOptions,
    )
}


def known_options(family: str) -> list[str]:
    """The options of ``family``, its own first, then ``devices``."""
    model = FAMILY_OPTIONS.get(family)
    return [k for k in (model.model_fields if model else ()) if k != "devices"] + ["devices"]


def unknown_option_message(family: str, key: str) -> str:
    """'unknown option ...; known: ...', saying which families the key belongs to, if any."""
    known = known_options(family)
    elsewhere = sorted(f for f, m in FAMILY_OPTIONS.items() if f != family and key in m.model_fields)
    if family == "json":
        elsewhere = [f for f in elsewhere if f != "json"]
    hint = f" ({key!r} is an option of {', '.join(elsewhere)})" if elsewhere else ""
    return f"unknown option {key[:80]!r} for device profile {family!r}{hint}; known: {', '.join(known)}"


class _FamilySource(_SourceBase):
    """A device family's source: its options are typed; the json source keys are refused."""

    @model_validator(mode="before")
    @classmethod
    def _json_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            family = str(data.get("profile"))
            for key in JSON_SOURCE_KEYS:
                if key in data:
                    known = ", ".join(known_options(family))
                    raise _KeyedError(
                        key,
                        f"{key!r} is a setting of the json profile; the {family} profile finds its "
                        f"topics itself and takes options: {known}",
                    )
        return data

    def family_options(self) -> dict[str, Any]:
        """The options :func:`edge.families.build_decoder` takes for this source."""
        options: FamilyOptions = getattr(self, "options")  # noqa: B009 - every subclass has one
        return options.model_dump()


class Zigbee2MqttSource(_FamilySource):
    """``profile: zigbee2mqtt``: a Zigbee2MQTT bridge's devices."""

    profile: Literal["zigbee2mqtt"] = Field(description="Device family (see docs/devices.md).")
    options: Zigbee2MqttOptions = Field(default_factory=Zigbee2MqttOptions, description="Family options.")


class TasmotaSource(_FamilySource):
    """``profile: tasmota``: Tasmota's telemetry (tele/<topic>/SENSOR, LWT)."""

    profile: Literal["tasmota"] = Field(description="Device family (see docs/devices.md).")
    options: TasmotaOptions = Field(default_factory=TasmotaOptions, description="Family options.")


class EsphomeSource(_FamilySource):
    """``profile: esphome``: ESPHome's MQTT client component."""

    profile: Literal["esphome"] = Field(description="Device family (see docs/devices.md).")
    options: EsphomeOptions = Field(default_factory=EsphomeOptions, description="Family options.")


class ShellySource(_FamilySource):
    """``profile: shelly``: Shelly Gen2+ status and NotifyStatus deltas."""

    profile: Literal["shelly"] = Field(description="Device family (see docs/devices.md).")
    options: ShellyOptions = Field(default_factory=ShellyOptions, description="Family options.")


class StatestreamSource(_FamilySource):
    """``profile: statestream``: Home Assistant's mqtt_statestream."""

    profile: Literal["statestream"] = Field(description="Device family (see docs/devices.md).")
    options: StatestreamOptions = Field(default_factory=StatestreamOptions, description="Family options.")


FAMILY_SOURCES: dict[str, type[JsonSource] | type[_FamilySource]] = {
    "json": JsonSource,
    "zigbee2mqtt": Zigbee2MqttSource,
    "tasmota": TasmotaSource,
    "esphome": EsphomeSource,
    "shelly": ShellySource,
    "statestream": StatestreamSource,
}


def _source_profile(value: Any) -> str:
    """The discriminator: ``profile``, json when absent."""
    profile = value.get("profile", "json") if isinstance(value, dict) else getattr(value, "profile", "json")
    return profile if isinstance(profile, str) else str(profile)


SourceConfig = Annotated[
    Annotated[JsonSource, Tag("json")]
    | Annotated[Zigbee2MqttSource, Tag("zigbee2mqtt")]
    | Annotated[TasmotaSource, Tag("tasmota")]
    | Annotated[EsphomeSource, Tag("esphome")]
    | Annotated[ShellySource, Tag("shelly")]
    | Annotated[StatestreamSource, Tag("statestream")],
    Discriminator(_source_profile),
]


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


class ExplainConfig(_Model):
    """Why this prediction: occlusion attributions in each answer (docs/configuration.md#explain).
    Off unless given; costs ``rows`` extra inference rows per answer (docs/models.md)."""

    method: Literal["occlusion"] = Field(
        "occlusion", description="Replace each part of the input by a baseline and run the model again."
    )
    segments: int = Field(8, ge=1, le=32, description="Window models: time segments the window is cut into.")
    baseline: Literal["auto", "manifest_mean", "window_mean", "zero"] = Field(
        "auto",
        description="What an occluded part becomes: the manifest's normalisation mean, the window's own "
        "per-channel mean, or 0; auto: manifest_mean if the manifest has one, else window_mean "
        "(windows) or zero (snapshots).",
    )
    max_rows: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most occluded rows per answer (snapshot: features; window: channels + segments); "
        "a model that needs more is refused at load.",
    )


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
    explain: ExplainConfig | None = Field(
        None, description="Attributions per answer (occlusion); off unless given. See ExplainConfig."
    )
    guard: bool = Field(
        False,
        description="While the rolling agreement with corrections is a problem, the entities are "
        "unavailable and no predictions are published (docs/corrections.md#the-guard).",
    )

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
    label_names: dict[str, str] | None = Field(
        None,
        description="Class label -> the name Home Assistant shows (default: the label made readable, "
        "fridge_freezer -> Fridge freezer); the raw label stays in the entity's 'label' attribute.",
    )


class LearnHaSource(_Model):
    """Home Assistant's WebSocket API (edge/learn/ha_ws.py); the token is never logged."""

    url: str | None = Field(
        None,
        description="Home Assistant's base URL, e.g. http://homeassistant.local:8123; leave it out "
        "inside the add-on (the Supervisor's proxy and token).",
    )
    token_file: Path | None = Field(None, description="File holding a long-lived access token.")
    token_env: str | None = Field(None, description="Environment variable holding the token.")

    @model_validator(mode="after")
    def _token(self) -> LearnHaSource:
        if self.url is not None and self.token_file is None and self.token_env is None:
            raise _KeyedError("token_file", "give token_file or token_env (a long-lived access token)")
        if self.url is None and (self.token_file is not None or self.token_env is not None):
            raise _KeyedError("url", "a token needs the URL of the Home Assistant it is for")
        return self


#: seconds per Home Assistant long-term statistics period
STATISTICS_PERIOD_S = {"5minute": 300.0, "hour": 3600.0}


class LearnStatistics(_Model):
    """Home Assistant's long-term statistics where states are not available (docs/learning-sources.md)."""

    use: Literal["off", "fill", "only"] = Field(
        "fill",
        description="fill: per entity, the span before its oldest kept state (all of the period when "
        "it has none) from statistics rows; only: statistics for every numeric entity, states not "
        "read for them; off: states only.",
    )
    period: Literal["5minute", "hour"] = Field(
        "hour", description="Which statistics: hour (kept for good) or 5minute (purged with states)."
    )
    value: Literal["mean", "min", "max"] = Field(
        "mean", description="The row's value fed as the entity's state at the row's start."
    )

    @field_validator("use", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted off as false: take it as meant.
        return "off" if value is False else value

    @property
    def period_s(self) -> float:
        return STATISTICS_PERIOD_S[self.period]

    @property
    def active(self) -> bool:
        return self.use != "off"


class LearnSource(_Model):
    """Where learn reads history: exactly one of ha, recorder_db, record."""

    ha: LearnHaSource | None = None
    recorder_db: Path | None = Field(None, description="A copy of home-assistant_v2.db (opened read-only).")
    record: Path | None = Field(None, description="A CSV/Parquet file written by edge-infer record.")
    statistics: LearnStatistics | None = Field(
        None,
        description="Also read Home Assistant's long-term statistics (ha or recorder_db), where states "
        "are not available; absent: states only.",
    )

    @model_validator(mode="after")
    def _one(self) -> LearnSource:
        given = [k for k in ("ha", "recorder_db", "record") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ha, recorder_db, record (got {given or 'none'})")
        if self.record is not None and self.statistics is not None and self.statistics.active:
            raise _KeyedError(
                "statistics",
                "a record file holds model inputs, not Home Assistant's statistics: use statistics "
                "with ha or recorder_db",
            )
        return self


class TeacherRule(_Model):
    """A label from other entities: a threshold on one, or any of several on recently."""

    entity: str | None = Field(None, description="Numeric entity; on while above (or below) the threshold.")
    above: float | None = None
    below: float | None = None
    any_on: list[str] | None = Field(None, description="Binary entities: on when any was on lately.")
    within_s: float = Field(0.0, ge=0, description="With any_on: 'lately' is the last within_s seconds.")
    on: str = Field("on", min_length=1, description="Class name while the rule holds.")
    off: str = Field("off", min_length=1, description="Class name otherwise.")

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans(cls, data: Any) -> Any:
        # YAML 1.1 reads the keys on/off (unquoted) as true/false: take them as meant.
        if isinstance(data, dict):
            names = {True: "on", False: "off"}
            return {names.get(k, k) if isinstance(k, bool) else k: v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _shape(self) -> TeacherRule:
        if (self.entity is None) == (self.any_on is None):
            raise ValueError("give exactly one of entity (with above/below) or any_on")
        if self.entity is not None and (self.above is None) == (self.below is None):
            raise _KeyedError("above", "a teacher entity needs exactly one of above or below")
        if self.any_on is not None and not self.any_on:
            raise _KeyedError("any_on", "name at least one entity")
        if self.on == self.off:
            raise _KeyedError("off", "on and off must be different class names")
        return self


class LearnLabels(_Model):
    """Where labels come from: exactly one of entity, teacher, corrections.
    ``{device}`` in an entity id is replaced by the device's name."""

    entity: str | None = Field(None, description="Any entity; its state (mapped by `map`) is the class.")
    map: dict[str, str] | None = Field(None, description="State -> class; other states are unlabelled.")
    teacher: TeacherRule | None = None
    corrections: bool = Field(False, description="The label store of the corrections (docs/corrections.md).")

    @model_validator(mode="after")
    def _one(self) -> LearnLabels:
        given = [k for k in ("entity", "teacher") if getattr(self, k) is not None]
        given += ["corrections"] if self.corrections else []
        if len(given) != 1:
            raise ValueError(f"give exactly one of entity, teacher, corrections (got {given or 'none'})")
        if self.map is not None and self.entity is None:
            raise _KeyedError("map", "map belongs to a label entity")
        return self


class ExcludeSpan(_Model):
    """A time range kept out of training (a gap: no window reaches into it)."""

    start: datetime
    end: datetime

    @model_validator(mode="after")
    def _order(self) -> ExcludeSpan:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("give times with a zone, e.g. 2026-11-20T10:00:00Z")
        if self.end <= self.start:
            raise _KeyedError("end", "end must be after start")
        return self


class LearnGate(_Model):
    """Promote only when the new model beats the baseline and the deployed model by margin."""

    margin: float = Field(0.02, ge=0, le=1, description="Required lead on the holdout metric.")
    metric: Literal["macro_f1", "accuracy"] = "macro_f1"


class LearnTrain(_Model):
    """The model learn trains and the bounds of the training process."""

    family: Literal["mlp", "cnn1d", "lstm", "gru"] | None = Field(
        None, description="Default: mlp for snapshots, cnn1d for windows."
    )
    hidden: list[int] | None = Field(None, description="Layer widths (default: the template's).")
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0
    threads: int = Field(1, ge=1, le=64, description="torch/OpenMP threads of the training process.")
    memory_mb: int = Field(1500, ge=256, description="The training process is stopped above this RSS.")
    nice: int = Field(10, ge=0, le=19, description="Scheduling niceness of the training process.")
    quantize: bool = Field(True, description="Also quantize to int8 (deployed when it is recommended).")


class LearnAnomaly(_Model):
    """An anomaly model learned from normal behaviour, no labels (docs/learning.md, "Anomaly models").

    An autoencoder over the device's own windows (exporters/anomaly.py)."""

    false_alarms_per_day: float = Field(
        0.1, gt=0, le=100_000, description="Target false alarms a day; the threshold is set for it."
    )
    confidence: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="The threshold allows the most held-out alarms whose one-sided Poisson upper bound "
        "at this confidence is within the target; the gate refuses a model whose test-block alarms "
        "put the target below their Poisson lower bound at it.",
    )
    max_alarm_share: float = Field(
        0.01,
        gt=0,
        le=1,
        description="The gate also refuses a model whose alarm is on for more than this share of the "
        "held-out normal windows (an alarm that stays on counts as one episode, so its time on is "
        "checked too).",
    )
    persist: int = Field(2, ge=1, le=100, description="Alarm on after this many scores in a row over it.")
    clear: int = Field(6, ge=1, le=1000, description="Alarm off after this many scores in a row under it.")
    view: Literal["raw", "sorted", "sorted_steps"] = Field(
        "sorted",
        description="What is reconstructed: the window as it came, its values sorted per channel "
        "(when in the window does not matter), or those and its sorted step sizes (switching counts).",
    )
    log1p: bool = Field(False, description="log(1 + x) of non-negative readings first (flow, rare peaks).")
    hidden: list[int] = Field(default_factory=lambda: [64, 16], description="Encoder layer widths.")
    epochs: int = Field(40, ge=1, le=10000, description="Passes over the training windows.")


class LearnSchedule(_Model):
    """Retrain on a schedule from the daemon (docs/learning.md, "Retraining from Home Assistant")."""

    every_days: int = Field(7, ge=1, le=365, description="Days from the last retrain to the next one.")
    at: str = Field("03:30", description="Local time of day it starts, HH:MM (24-hour clock).")

    @field_validator("at")
    @classmethod
    def _time_of_day(cls, value: str) -> str:
        found = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value.strip())
        if found is None:
            raise ValueError(f"give a local time of day as HH:MM, e.g. 03:30 (got {value[:40]!r})")
        return f"{int(found.group(1)):02d}:{found.group(2)}"

    @property
    def hour_minute(self) -> tuple[int, int]:
        hour, minute = self.at.split(":")
        return int(hour), int(minute)


class LearnConfig(_Model):
    """``edge-infer learn``: train this pipeline's model on the home's own history (docs/learning.md)."""

    source: LearnSource
    days: float = Field(14.0, gt=0, description="How much history to read, ending now (or at `end`).")
    end: datetime | None = Field(None, description="End of the history read (default: now).")
    inputs: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Per device: model feature -> entity id (not for record)."
    )
    labels: LearnLabels | None = Field(
        None, description="Required except for a record source or an anomaly model (no labels)."
    )
    exclude: list[ExcludeSpan] = Field(default_factory=list)
    gate: LearnGate = Field(default_factory=LearnGate)
    min_examples_per_class: int = Field(20, ge=1)
    test_fraction: float = Field(0.25, gt=0, lt=1, description="The newest share, held out for the gate.")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="Before the test block, for early stopping.")
    train: LearnTrain = Field(default_factory=LearnTrain)
    anomaly: LearnAnomaly | None = Field(
        None,
        description="Learn an anomaly model from data marked normal, without labels (`anomaly: {}` for "
        "the defaults); required when the model's task is anomaly.",
    )
    work_dir: Path | None = Field(None, description="Table, checkpoint, card (default: learn/PIPELINE).")
    keep_flagged: bool = Field(
        False,
        description="Keep rows inside spans the daemon flagged as inputs unlike training "
        "(flagged_spans.json beside state.file); by default they are left out (docs/drift.md).",
    )
    schedule: LearnSchedule | None = Field(
        None, description="Retrain from the daemon every_days at a local time (default: only on request)."
    )
    max_memory_mb: int = Field(
        2048,
        ge=256,
        description="Address-space cap of the learn process the daemon starts (Retrain now, schedule); "
        "its training process keeps train.memory_mb.",
    )

    @model_validator(mode="after")
    def _complete(self) -> LearnConfig:
        if self.anomaly is not None and self.labels is not None:
            raise _KeyedError(
                "labels", "an anomaly model learns from normal data without labels: leave labels out"
            )
        if self.source.record is None:
            if not self.inputs:
                raise _KeyedError("inputs", "map each device's model features to entity ids")
            if self.labels is None and self.anomaly is None:
                raise _KeyedError("labels", "say where labels come from (entity, teacher or corrections)")
        if self.source.record is not None and self.labels is not None and not self.labels.corrections:
            raise _KeyedError("labels", "a record source's rows carry their own label: leave labels out")
        for device, mapping in self.inputs.items():
            if not mapping:
                raise _KeyedError(f"inputs.{device}", "map at least one model feature to an entity id")
        if self.end is not None and self.end.tzinfo is None:
            raise _KeyedError("end", "give a time with a zone, e.g. 2026-11-20T10:00:00Z")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise _KeyedError("val_fraction", "test_fraction + val_fraction leaves too little to train on")
        stats = self.source.statistics
        if stats is not None and stats.active and self.labels is not None and self.labels.corrections:
            raise _KeyedError(
                "source.statistics",
                "corrections are model inputs already: statistics are not read for them (leave it out)",
            )
        return self


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
    learn: LearnConfig | None = Field(None, description="Where `edge-infer learn` finds data and labels.")

    @model_validator(mode="after")
    def _learn_statistics(self) -> PipelineConfig:
        stats = self.learn.source.statistics if self.learn is not None else None
        if stats is not None and stats.active:
            problem = statistics_problem(stats, self.features)
            if problem is not None:
                raise _KeyedError(*problem)
        return self


def statistics_problem(
    stats: LearnStatistics, features: SnapshotFeatures | WindowFeatures
) -> tuple[str, str] | None:
    """Why ``stats`` cannot feed a pipeline with ``features`` (key, message), or None.

    A statistics row stands for its whole period, so it may only feed a model whose inputs are at
    least that coarse: a window resampled to ``resample_period_s`` >= the period (and whose
    ``max_gap_s`` does not restart it between two rows), or a snapshot whose ``max_age_s`` is at
    least the period."""
    key = "learn.source.statistics.period"
    p = stats.period_s
    what = f"{stats.period} statistics ({p:g} s per row)"
    if isinstance(features, SnapshotFeatures):
        if p > features.max_age_s:
            return key, (
                f"{what} are coarser than features.max_age_s={features.max_age_s:g}: a snapshot model "
                f"is served readings at most {features.max_age_s:g} s old (use period: 5minute, raise "
                "max_age_s, or leave statistics out)"
            )
        return None
    if features.resample_period_s is None:
        return "learn.source.statistics", (
            f"{what} need a resampled window: set features.resample_period_s (at least {p:g}) or "
            "leave statistics out"
        )
    if p > features.resample_period_s:
        return key, (
            f"{what} are coarser than features.resample_period_s={features.resample_period_s:g}: "
            "windows of them would hold one value for several samples, unlike what the model is "
            "served (use period: 5minute, a resample period of at least the statistics period, or "
            "leave statistics out)"
        )
    if features.max_gap_s is not None and p > features.max_gap_s:
        return key, (
            f"{what} are further apart than features.max_gap_s={features.max_gap_s:g}: every row "
            f"would restart the window (raise max_gap_s to at least {p:g})"
        )
    return None


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
        "",
        description="Names this daemon's bridge device; default: 8 hex digits of the config's absolute "
        "path and mqtt.base_topic (as the client id), so each config on a host has its own.",
    )
    forget_after_days: float | None = Field(
        7.0,
        gt=0,
        description="A device no pipeline has answered for this long is removed from Home Assistant "
        "(null: never). With state.file the last answers are kept there, so the time counts across "
        "restarts; without it a restart counts as an answer.",
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


class CorrectionsConfig(_Model):
    """Corrections from Home Assistant (see docs/corrections.md)."""

    enabled: bool = Field(True, description="Command topics subscribed, select/buttons announced.")
    ring: int = Field(4, ge=1, le=64, description="Answered inputs kept per device for corrections.")
    max_rows: int = Field(100_000, ge=1, description="Corrections kept in the label store at most.")
    max_mib: float = Field(256.0, gt=0, description="Input bytes kept in the label store at most (MiB).")
    agreement_window: int = Field(50, ge=1, description="Recent corrections the rolling agreement counts.")
    agreement_min: int = Field(20, ge=1, description="Corrections needed before the agreement is judged.")
    agreement_margin: float = Field(
        0.1, ge=0, le=1, description="A problem when the agreement is below holdout accuracy minus this."
    )


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
    corrections: CorrectionsConfig = Field(default_factory=CorrectionsConfig)
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

    def with_identity(self, identity: str) -> Config:
        """Fill the per-config defaults: the client id ``edge-infer-<hostname>-<hash>`` and the
        Home Assistant ``instance_id`` ``<hash>``, where ``<hash>`` is 8 hex digits of sha256 of
        ``identity`` (the config file's absolute path) and ``mqtt.base_topic``. Stable across
        restarts of the same config; two configs on one host never share a broker session or
        a bridge device. In a cluster the client id ends in ``-{instance}`` and the instance id
        hashes the base topic alone (the members share it). Explicit ``mqtt.client_id`` /
        ``homeassistant.instance_id`` win."""
        digest = _identity_hash(f"{identity}\n{self.mqtt.base_topic}")
        config = self
        if self.mqtt.client_id is None:
            host = _mqtt_string_safe(socket.gethostname())
            # In a cluster, instance_mqtt() puts the instance id in the placeholder.
            client_id = f"edge-infer-{host}-{digest}" + ("-{instance}" if self.cluster.enabled else "")
            config = config.model_copy(update={"mqtt": self.mqtt.model_copy(update={"client_id": client_id})})
        if not self.homeassistant.instance_id:
            # A cluster's members announce the same shared entities whatever their config's path:
            # there the id comes from the base topic alone, which they share.
            shared = _identity_hash(f"cluster\n{self.mqtt.base_topic}") if self.cluster.enabled else digest
            ha = self.homeassistant.model_copy(update={"instance_id": shared})
            config = config.model_copy(update={"homeassistant": ha})
        return config

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


def _mqtt_string_safe(text: str) -> str:
    """A host name made fit for a client id (letters, digits, '-', '_', '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:64] or "host"


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
    # Drop discriminated-union tags pydantic inserts ("window", "snapshot") after "features" and
    # the family ("zigbee2mqtt") after "source".
    cleaned: list[str] = []
    for index, part in enumerate(loc):
        if index > 0 and loc[index - 1] == "features" and part in ("window", "snapshot"):
            continue
        if index > 0 and loc[index - 1] == "source" and part in FAMILY_SOURCES:
            continue
        cleaned.append(part)
    key = dotted_key(cleaned)
    ctx = first.get("ctx") or {}
    if first["type"] == "union_tag_invalid" and cleaned and cleaned[-1] == "source":
        return ConfigError(
            _bounded(f"{key}.profile", 300),
            f"unknown device profile {_bounded(repr(ctx.get('tag')), 80)}; known: "
            + ", ".join(sorted(FAMILY_SOURCES)),
            source,
        )
    inner = ctx.get("error")
    if isinstance(inner, _KeyedError):
        full = ".".join(k for k in (key, inner.key) if k) if not inner.key.startswith(key) else inner.key
        return ConfigError(full, _bounded(inner.message), source)
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check its spelling; see docs/configuration.md)"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if first["type"] != "missing" and "input" in first and not isinstance(first["input"], dict | list):
        shown = first["input"]
        if key.endswith("url") and isinstance(shown, str):
            shown = mask_url(shown)
        if "password" not in key:
            text = repr(shown)
            message += f" (got {text if len(text) <= 200 else text[:200] + '...'})"
    extra = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return ConfigError(_bounded(key, 300), _bounded(message) + extra, source)


def _bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Error messages quote user input: a bounded part of it."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def parse_config(
    data: Any, source: str = "config", base_dir: Path | None = None, identity: str | None = None
) -> Config:
    """Validate a parsed YAML document; relative model, state, password and TLS paths resolve
    against ``base_dir``; ``identity`` (default ``source``) seeds the default client id and
    Home Assistant instance id (:meth:`Config.with_identity`)."""
    if not isinstance(data, dict):
        raise ConfigError("", "the file must be a YAML mapping with 'models' and 'pipelines'", source)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise _format_validation(exc, source) from None
    except RecursionError:  # pragma: no cover - load_config bounds the depth first
        raise ConfigError("", "the document is nested too deeply", source) from None
    config = _resolve_zoo(config, source)
    if base_dir is not None:
        config = _relative_to(config, base_dir)
    config = config.with_identity(identity if identity is not None else source)
    cluster = config.cluster
    if cluster.enabled and cluster.resolved_instance() == config.homeassistant.instance_id:
        raise ConfigError(
            "cluster.instance",
            f"{cluster.resolved_instance()!r} is homeassistant.instance_id, which names the shared "
            "entities; give the instance another id",
            source,
        )
    return config


def _resolve_zoo(config: Config, source: str) -> Config:
    """``path: zoo:NAME[.VARIANT]`` -> the bundled model file (edge/zoo.py)."""
    models = {}
    for name, model in config.models.items():
        text = str(model.path)
        if not zoo.is_zoo_ref(text):
            models[name] = model
            continue
        try:
            models[name] = model.model_copy(update={"path": zoo.resolve(text).path})
        except zoo.ZooError as exc:
            raise ConfigError(f"models.{name}.path", str(exc), source) from None
    return config.model_copy(update={"models": models})


def _relative_to(config: Config, base_dir: Path) -> Config:
    """Relative model, state, password and TLS paths resolve against the config's folder (under
    systemd the working directory is ``/``)."""

    def rebase(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base_dir / path

    models = {name: m.model_copy(update={"path": rebase(m.path)}) for name, m in config.models.items()}
    config = config.model_copy(update={"models": models})
    if config.state.file is not None:
        config = config.model_copy(
            update={"state": config.state.model_copy(update={"file": rebase(config.state.file)})}
        )
    pipelines = {}
    for name, original in config.pipelines.items():
        pipe, learn = original, original.learn
        if learn is not None:
            src = learn.source
            ha = src.ha.model_copy(update={"token_file": rebase(src.ha.token_file)}) if src.ha else None
            src = src.model_copy(
                update={"ha": ha, "recorder_db": rebase(src.recorder_db), "record": rebase(src.record)}
            )
            learn = learn.model_copy(update={"source": src, "work_dir": rebase(learn.work_dir)})
            pipe = pipe.model_copy(update={"learn": learn})
        pipelines[name] = pipe
    config = config.model_copy(update={"pipelines": pipelines})
    mqtt = config.mqtt.model_copy(update={"password_file": rebase(config.mqtt.password_file)})
    tls = mqtt.tls
    if tls is not None:
        tls = tls.model_copy(
            update={k: rebase(getattr(tls, k)) for k in ("ca_file", "cert_file", "key_file")}
        )
        mqtt = mqtt.model_copy(update={"tls": tls})
    return config.model_copy(update={"mqtt": mqtt})


def load_config(path: str | Path, mqtt_url: str | None = None, instance: str | None = None) -> Config:
    """Read, validate and apply the overrides: the broker URL (argument, else
    ``EDGE_INFER_MQTT_URL``) and the cluster instance id (argument, else ``EDGE_INFER_INSTANCE``)."""
    path = Path(path)
    try:
        raw = read_limited(path, "", MAX_CONFIG_BYTES, "the config file")
    except ConfigError as exc:
        raise ConfigError("", exc.message, str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            "", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} (save it as UTF-8)", str(path)
        ) from None
    data = parse_yaml(text, str(path))
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
    return parse_config(data, str(path), path.resolve().parent, identity=str(path.resolve()))


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounds: nesting depth, alias count and integer digits. (The
    expanded size is bounded after loading, by :func:`_count_nodes`.)"""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(_Problem(f"more than {MAX_YAML_ALIASES} aliases", self.peek_event()))  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise yaml.YAMLError(_Problem(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event()))  # type: ignore[no-untyped-call]
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> Any:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits (at most {MAX_INT_DIGITS})", node.start_mark
            )
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


class _Problem:
    """A YAMLError's payload with a problem text and a mark, as PyYAML's own errors have."""

    def __init__(self, problem: str, event: Any) -> None:
        self.problem = problem
        self.problem_mark = getattr(event, "start_mark", None)

    def __str__(self) -> str:
        return self.problem


def _count_nodes(node: Any, budget: int) -> int:
    """Values in ``node`` counted as if aliases were copies; stops once past ``budget``."""
    stack = [node]
    count = 0
    while stack and count <= budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def parse_yaml(text: str, source: str) -> Any:
    """YAML text to data, bounded (depth, aliases, expanded size, integer digits); any problem
    is a ConfigError with the line and column."""
    try:
        loader = _BoundedLoader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], _Problem) else exc
        mark = getattr(detail, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(detail, "problem", None) or str(detail)
        raise ConfigError("", f"not valid YAML{where}: {_bounded(str(problem), 300)}", source) from None
    except RecursionError:
        raise ConfigError("", f"not valid YAML: nested deeper than {MAX_YAML_DEPTH} levels", source) from None
    if _count_nodes(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(
            "", f"more than {MAX_YAML_NODES} values once aliases are expanded (an alias bomb?)", source
        )
    return data


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
