"""Typed settings, loaded once at start-up.

Sources, later ones winning: ``config/gateway.yaml`` (the embedded defaults), any extra YAML files
named with ``--config``, then environment variables ``GATEWAY__SECTION__KEY`` (values parsed as
YAML, except secrets: a ``secret`` or ``password`` value is taken verbatim, as a string).
Unknown keys and invalid values stop start-up with a :class:`ConfigError` that names the key.
Secrets (keys named ``secret`` or ``password``) are refused in YAML files: they come from the
environment or from a ``*_file`` key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.approval import ApprovalSettings
from gateway.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "gateway.yaml"
ENV_PREFIX = "GATEWAY__"
SECRET_KEYS = frozenset({"secret", "password", "signing_keys", "webhook_secrets", "sasl_password"})

Role = Literal["intake", "dispatch", "receipts"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Section):
    roles: tuple[Role, ...] = ("intake", "dispatch", "receipts")


class KafkaSettings(_Section):
    """The broker, and how to reach a managed one (MSK, Confluent Cloud, Redpanda Cloud, Aiven):
    TLS (``security_protocol: SSL``, a CA file if the broker's certificate is not in the system's
    store, a client certificate for mutual TLS) and SASL (PLAIN or SCRAM, username and password;
    the password a secret). Every client the gateway makes — producer, consumers, admin — gets the
    same options (``gateway.kafka.client_options``)."""

    bootstrap_servers: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    # a secret: GATEWAY__KAFKA__SASL_PASSWORD or sasl_password_file, never YAML
    sasl_password: str | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None  # the CA that signed the broker's certificate (else the system's)
    ssl_certfile: Path | None = None  # mutual TLS: this client's certificate …
    ssl_keyfile: Path | None = None  # … and its key
    ssl_check_hostname: bool = True
    # false: the topics are made by whoever runs the cluster; start-up checks they exist with at
    # least ``partitions`` partitions each, and refuses naming what is missing
    create_topics: bool = True
    topic_advisories: str = "advisories"
    topic_deliveries: str = "deliveries"
    topic_deliveries_urgent: str = "deliveries.urgent"
    topic_events: str = "delivery-events"
    topic_dlq: str = "advisories.dlq"
    partitions: int = Field(4, ge=1, le=256)
    intake_group: str = "gateway-intake"
    dispatch_group: str = "gateway-dispatch"
    session_timeout_ms: int = Field(6000, ge=1000)
    # how long a consumer's fetch may wait at the broker when it has nothing new (Kafka's default is
    # 500 ms): with the embedded broker it showed in each hop of an urgent advisory (advisories →
    # intake, deliveries.urgent → dispatch): first request p50 0.66 s at 500 ms, 0.43 s at 50 ms
    fetch_max_wait_ms: int = Field(100, ge=1, le=10_000)
    # what the gateway's producers compress each batch with. A broadcast's delivery events are ~1 kB
    # of JSON a delivery: zstd keeps them at a fifth on the broker and the wire (measured at 200,000:
    # the embedded broker's memory 180 → 36 MB) for about the CPU the broker saves; Kafka clients
    # from 2.1 (2018) on read it. lz4 (aiokafka's level 9) cost the gateway more CPU and saved less
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"

    @model_validator(mode="after")
    def _security(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and (self.sasl_mechanism is None or not self.sasl_username):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism (PLAIN, SCRAM-SHA-256 "
                "or SCRAM-SHA-512), sasl_username and the password (GATEWAY__KAFKA__SASL_PASSWORD)"
            )
        if not sasl and (self.sasl_mechanism or self.sasl_username):
            raise ValueError(
                f"sasl_mechanism and sasl_username need security_protocol SASL_SSL (or SASL_PLAINTEXT), "
                f"not {self.security_protocol}"
            )
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        files = {
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        given = [k for k, v in files.items() if v is not None]
        if given and not tls:
            raise ValueError(
                f"{given[0]} needs security_protocol SSL or SASL_SSL, not {self.security_protocol}"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        for key in given:
            path = files[key]
            assert path is not None
            if not path.is_file():
                raise ValueError(f"{key}: {path} is not a readable file")
        return self

    def sasl_secret(self) -> str | None:
        """The SASL password (environment or file); required with a SASL protocol."""
        password = read_secret("kafka.sasl_password", self.sasl_password, self.sasl_password_file)
        if self.security_protocol.startswith("SASL_") and not password:
            raise ConfigError(
                "kafka.sasl_password: missing (GATEWAY__KAFKA__SASL_PASSWORD or kafka.sasl_password_file)"
            )
        return password


class StoreSettings(_Section):
    url: str = "sqlite+aiosqlite:///var/gateway.db"
    # an older schema at start-up: upgrade it, or refuse and name `broadcast-gateway db upgrade`
    migrate: Literal["upgrade", "refuse"] = "upgrade"


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = None


class InputLimits(_Section):
    """Limits on an advisory record (or a receipt body): each refusal names the limit passed."""

    max_record_bytes: int = Field(262_144, ge=1024)
    max_depth: int = Field(16, ge=2, le=200)  # nesting of objects and lists
    max_string_chars: int = Field(8000, ge=64)
    max_list_items: int = Field(1000, ge=1)  # items of a list, keys of an object
    max_languages: int = Field(24, ge=1)
    max_channels: int = Field(8, ge=1)
    max_version: int = Field(1_000_000, ge=1)


class XmlDsigSender(_Section):
    """A sender whose CAP documents may carry an enveloped XML-DSig signature (gateway/xmldsig.py)."""

    # required: a CAP document from this sender must carry a signature that verifies against one of
    # the certificates; optional: a signature, if present, must verify (else the Ed25519 header does)
    policy: Literal["required", "optional"] = "optional"
    # PEM certificates (the text itself, or the path of a PEM file)
    certificates: tuple[str, ...] = Field(min_length=1)


class IntakeSettings(_Section):
    require_signature: bool = True
    trusted_keys: dict[str, str] = Field(default_factory=dict)
    # sender -> XML-DSig certificates and policy, for CAP relayed as it comes (an aggregator's feed)
    xmldsig: dict[str, XmlDsigSender] = Field(default_factory=dict)
    # sender -> the senders whose advisories it may also cancel or update (its own, always)
    authorities: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    limits: InputLimits = InputLimits()
    # CAP carries no channels: a CAP advisory goes out on these, in this cascade order
    cap_channels: tuple[str, ...] = ("push", "sms-http", "email")


class ApiSettings(_Section):
    """The press office's API (gateway/submissions.py)."""

    # sender -> base64 Ed25519 private key: the API signs what an authorized token submits for that
    # sender (JSON text; a secret: GATEWAY__API__SIGNING_KEYS or signing_keys_file, never YAML)
    signing_keys: str | None = None
    signing_keys_file: Path | None = None
    max_body_bytes: int = Field(262_144, ge=1024)

    def keys(self) -> dict[str, str]:
        raw = read_secret("api.signing_keys", self.signing_keys, self.signing_keys_file)
        if not raw:
            return {}
        try:
            keys = json.loads(raw)
        except ValueError as e:
            raise ConfigError("api.signing_keys: not a JSON object of sender -> base64 key") from e
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise ConfigError("api.signing_keys: not a JSON object of sender -> base64 key")
        return {str(k): v for k, v in keys.items()}


class WebhookSettings(_Section):
    """One receiver of delivery events (gateway/events.py); its HMAC secret is in
    ``events.webhook_secrets`` under the same name."""

    url: str = Field(pattern=r"^https?://")
    max_attempts: int = Field(8, ge=1, le=100)  # then the batch is given up (it stays on the topic)
    timeout_s: float = Field(10.0, gt=0)


class EventsSettings(_Section):
    """Delivery events out: every applied status change to the ``delivery-events`` topic and to the
    configured webhooks (gateway/events.py)."""

    enabled: bool = True
    poll_s: float = Field(0.2, gt=0)  # how often the outbox is read when it was empty
    batch: int = Field(500, ge=1, le=10_000)  # events in one webhook call at most
    # events taken from the outbox at a time (one read, one delete), published as records of at most
    # 1000 events and webhook calls of at most ``batch``: a take of 500 kept up with ~11,000 events/s,
    # and a broadcast makes three events a delivery
    take: int = Field(5000, ge=1, le=100_000)
    webhooks: dict[str, WebhookSettings] = Field(default_factory=dict)
    # name -> HMAC secret (JSON object; a secret: GATEWAY__EVENTS__WEBHOOK_SECRETS or
    # webhook_secrets_file, never YAML)
    webhook_secrets: str | None = None
    webhook_secrets_file: Path | None = None
    queue_batches: int = Field(100, ge=1)  # per webhook, batches waiting; full: the publisher waits

    def secrets(self) -> dict[str, str]:
        raw = read_secret("events.webhook_secrets", self.webhook_secrets, self.webhook_secrets_file)
        try:
            found = json.loads(raw) if raw else {}
        except ValueError as e:
            raise ConfigError("events.webhook_secrets: not a JSON object of webhook name -> secret") from e
        if not isinstance(found, dict) or not all(isinstance(v, str) and v for v in found.values()):
            raise ConfigError("events.webhook_secrets: not a JSON object of webhook name -> secret")
        missing = sorted(set(self.webhooks) - set(found))
        if missing:
            raise ConfigError(
                f"events.webhook_secrets: no secret for webhook {missing[0]!r} (every webhook is signed)"
            )
        return {name: found[name] for name in self.webhooks}


class TrainingSettings(_Section):
    """Training advisories (gateway/training.py) go only to the gateway's own sandbox partners."""

    receipt_delay_s: float = Field(0.2, ge=0)


class RenderingSettings(_Section):
    templates_dir: Path = Path("templates")
    default_language: str = Field("en", min_length=2)

    def templates_path(self) -> Path:
        """The templates folder; a relative path is taken from the project root."""
        path = self.templates_dir
        return path if path.is_absolute() else PROJECT_ROOT / path


class PlannerSettings(_Section):
    chunk_size: int = Field(500, ge=1, le=10_000)  # delivery ids per chunk on a deliveries topic
    # recipients read and planned at a time (advisories of equal priority take turns per page; each
    # page costs three writes and a wait for the broker, whatever its size)
    page_size: int = Field(2_000, ge=1, le=50_000)
    # how often the store is asked for advisories stored by another intake process
    poll_s: float = Field(1.0, gt=0)
    # an instance plans an advisory under a lease renewed each page; another instance takes it over
    # (from the stored cursor) when its holder has not renewed it for this long (it died)
    lease_s: float = Field(15.0, gt=0)


class DispatchSettings(_Section):
    max_attempts: int = Field(5, ge=1)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    # chunks fetched and unfinished per lane (urgent, bulk) before consumption pauses
    max_buffered_chunks: int = Field(32, ge=2, le=10_000)
    # on stop: how long workers may finish the chunk in hand before it is left for the next consumer
    drain_timeout_s: float = Field(10.0, gt=0)
    # partners without idempotency keys (SMTP, SMPP): a delivery is claimed by the instance sending
    # it for this long, renewed every third of it; another instance (or this one restarted) holding
    # it in a chunk waits that out if the holder died
    claim_s: float = Field(15.0, gt=0)


class SweeperSettings(_Section):
    interval_s: float = Field(5.0, gt=0)
    receipt_timeout_s: float = Field(3600.0, gt=0)  # sent this long with no receipt: unknown


class ReceiptsSettings(_Section):
    # a receipt naming a partner id no delivery has yet (its send's answer not recorded) is held
    # and tried again every retry_s, until hold_s after it came: then it is given up (unmatched)
    retry_s: float = Field(1.0, gt=0)
    hold_s: float = Field(600.0, gt=0)


class CascadeSettings(_Section):
    interval_s: float = Field(1.0, gt=0)  # how often unconfirmed deliveries are looked for
    page: int = Field(500, ge=1, le=10_000)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(_Section):
    gateway: GatewaySection = GatewaySection()
    kafka: KafkaSettings = KafkaSettings()
    store: StoreSettings = StoreSettings()
    http: HttpSettings = HttpSettings()
    intake: IntakeSettings = IntakeSettings()
    api: ApiSettings = ApiSettings()
    approval: ApprovalSettings = ApprovalSettings()
    training: TrainingSettings = TrainingSettings()
    rendering: RenderingSettings = RenderingSettings()
    planner: PlannerSettings = PlannerSettings()
    dispatch: DispatchSettings = DispatchSettings()
    sweeper: SweeperSettings = SweeperSettings()
    receipts: ReceiptsSettings = ReceiptsSettings()
    cascade: CascadeSettings = CascadeSettings()
    events: EventsSettings = EventsSettings()
    # channel name -> that adapter's own settings, validated by the adapter's settings model
    channels: dict[str, dict[str, Any]] = Field(default_factory=dict)
    logging: LoggingSettings = LoggingSettings()


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _refuse_secrets(data: Any, source: Path, path: tuple[str, ...] = ()) -> None:
    if not isinstance(data, Mapping):
        return
    for key, value in data.items():
        here = (*path, str(key))
        if str(key) in SECRET_KEYS and value is not None:
            raise ConfigError(
                f"{'.'.join(here)}: secrets may not be written in {source}; set "
                f"{ENV_PREFIX}{'__'.join(p.upper() for p in here)} or {'.'.join(here)}_file"
            )
        _refuse_secrets(value, source, here)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    _refuse_secrets(data, path)
    return data


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        if keys[-1] in SECRET_KEYS:
            value: Any = raw if raw != "" else None  # verbatim: "abc #def" is not "abc"
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError as e:
                raise ConfigError(f"{name}: value is not valid YAML: {e}") from e
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: conflicts with another GATEWAY__ variable")
        node[keys[-1]] = value
    return out


def _hyphenate_channels(env: dict[str, Any], data: Mapping[str, Any]) -> None:
    """GATEWAY__CHANNELS__SMS_HTTP__… names the channel ``sms-http`` (a variable name has no hyphen)."""
    channels = env.get("channels")
    known = data.get("channels") or {}
    if not isinstance(channels, dict):
        return
    for name in list(channels):
        hyphenated = name.replace("_", "-")
        if name not in known and hyphenated in known:
            channels[hyphenated] = channels.pop(name)


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the key: ``kafka.partitions: Input should be ...``."""
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        else:
            lines.append(f"{loc}: {err['msg']}")
    return "; ".join(lines)


def load_settings(
    extra_files: list[Path] | None = None,
    environ: Mapping[str, str] | None = None,
    base_file: Path = DEFAULT_CONFIG,
) -> Settings:
    """Read, merge and validate every source; raise ConfigError naming the bad key."""
    data = _read_yaml(base_file)
    for path in extra_files or []:
        data = _merge(data, _read_yaml(path))
    env = _env_overrides(os.environ if environ is None else environ)
    _hyphenate_channels(env, data)
    data = _merge(data, env)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from e


def read_secret(key: str, value: str | None, file: Path | None) -> str | None:
    """A secret from its value (environment) or from its file ``<key>_file``; never both."""
    if value is not None and file is not None:
        raise ConfigError(f"{key} and {key}_file are both set; keep one")
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{key}_file: cannot read {file}: {e.strerror}") from e
    return value
