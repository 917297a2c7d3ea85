"""Typed, validated settings: TOML file < ``DICOM_NODE_*`` environment variables < CLI flags.

Settings are loaded once, by :func:`load_settings`, into one frozen :class:`Settings` object that
is passed explicitly to whatever needs it. Every problem raises :class:`ConfigError` with one line
that names the source (file, variable or flag), the key, the value and what was expected.
"""

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError

ENV_PREFIX = "DICOM_NODE_"
ENV_CONFIG = "DICOM_NODE_CONFIG"
DEFAULT_CONFIG = Path("config/node.toml")

_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


class ByteSize(int):
    """A number of bytes; configured as an integer or a string such as ``"512 MiB"``."""


def _ae_title(value: str) -> str:
    stripped = value.strip()
    if not _AE_TITLE_RE.match(value) or not stripped:
        raise ValueError("an AE title of 1 to 16 printable ASCII characters without backslash")
    return stripped


def _token(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9._~+/=-]{16,}", value):
        raise ValueError("at least 16 characters of letters, digits and ._~+/=- (no spaces, quotes, ; or ,)")
    return value


def _origin(value: str) -> str:
    if value != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", value):
        raise ValueError('an origin such as "https://viewer.example.org:3000" '
                         '(scheme, host, port; no path), or "*"')
    return value


def _public_url(value: str) -> str:
    if value and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/]*)?", value):
        raise ValueError('the node\'s web root as clients reach it, such as "https://pacs.example.org/node" '
                         "(scheme, host, optional port and path; no query)")
    return value.rstrip("/")


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("a TCP port from 0 to 65535 (0 picks a free one)")
    return value


def _positive(value: int | float) -> int | float:
    if value <= 0:
        raise ValueError("a number greater than 0")
    return value


def _non_negative(value: int | float) -> int | float:
    if value < 0:
        raise ValueError("a number of 0 or more")
    return value


def _pdu_size(value: int) -> int:
    if not 4096 <= value <= 1_048_576:
        raise ValueError("a maximum PDU size from 4096 to 1048576 bytes")
    return value


def _peer(value: str) -> str:
    aet, sep, host = value.partition("@")
    _ae_title(aet)
    if sep:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("a calling AE title, optionally followed by @ and an IP address") from None
    return value


def _long_string(value: str) -> str:
    if len(value) > 64 or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError("at most 64 characters, no backslash or control characters (DICOM LO)")
    return value


def _listener(value: str) -> str:
    if value not in LISTENERS:
        raise ValueError(f"a list of listeners from {sorted(LISTENERS)}")
    return value


def _tls_version(value: str) -> str:
    if value not in TLS_VERSIONS:
        raise ValueError(f"one of {sorted(TLS_VERSIONS)} (BCP 195: never below TLS 1.2)")
    return value


def _name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ValueError("a name of letters, digits, '_', '.', '-' (1 to 64, starting alphanumeric)")
    return value


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("a non-empty string")
    return value


def _peer_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("a TCP port from 1 to 65535")
    return value


def _log_level(value: str) -> str:
    if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("one of DEBUG, INFO, WARNING, ERROR")
    return value.upper()


#: What the node listens for (``node.listen``): plain DICOM on ``node.port``, DICOM TLS on ``tls.port``.
LISTENERS = frozenset({"plain", "tls"})
#: The lowest TLS version a setting may allow: BCP 195 (RFC 9325) forbids TLS 1.0 and 1.1.
TLS_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3"})


def _check(validator: Any) -> dict[str, Any]:
    return {"validator": validator}


@dataclass(frozen=True)
class NodeSettings:
    """``[node]``: who the node is on the network and where it keeps its data."""

    ae_title: str = field(default="XAI_NODE", metadata=_check(_ae_title))
    bind: str = "0.0.0.0"
    port: int = field(default=11112, metadata=_check(_port))
    data_dir: Path = Path("var")
    allowed_peers: tuple[str, ...] = field(default=(), metadata=_check(_peer))
    # Institution Name of the outputs' equipment (General Equipment, Contributing Equipment)
    institution_name: str = field(default="", metadata=_check(_long_string))
    # plain DICOM on node.port, DICOM TLS on tls.port, or both
    listen: tuple[str, ...] = field(default=("plain",), metadata=_check(_listener))
    query_peers: tuple[str, ...] = field(default=(), metadata=_check(_peer))


@dataclass(frozen=True)
class IngestSettings:
    """``[ingest]``: the association and C-STORE limits of the SCP."""

    max_associations: int = field(default=16, metadata=_check(_positive))
    max_associations_per_host: int = field(default=8, metadata=_check(_positive))
    max_pdu_size: int = field(default=131072, metadata=_check(_pdu_size))
    max_instance_size: ByteSize = field(default=ByteSize(2 * 2**30), metadata=_check(_positive))
    spool_threshold: ByteSize = field(default=ByteSize(4 * 2**20), metadata=_check(_non_negative))
    acse_timeout: float = field(default=30.0, metadata=_check(_positive))
    dimse_timeout: float = field(default=60.0, metadata=_check(_positive))
    network_timeout: float = field(default=60.0, metadata=_check(_positive))
    shutdown_grace_seconds: float = field(default=10.0, metadata=_check(_non_negative))
    handshake_timeout: float = field(default=5.0, metadata=_check(_positive))
    handshake_evict_after: float = field(default=1.0, metadata=_check(_non_negative))
    max_handshakes: int = field(default=64, metadata=_check(_positive))
    max_connections_per_host: int = field(default=20, metadata=_check(_positive))
    connects_per_host_per_minute: int = field(default=600, metadata=_check(_positive))
    log_lines_per_host_per_minute: int = field(default=10, metadata=_check(_non_negative))


@dataclass(frozen=True)
class StoreSettings:
    """``[store]``: the instance store on disk."""

    min_free_space: ByteSize = field(default=ByteSize(2**30), metadata=_check(_non_negative))


def _percent(value: float) -> float:
    if not 0 <= value < 100:
        raise ValueError("a share of the file system in percent, from 0 (off) to below 100")
    return value


@dataclass(frozen=True)
class RetentionSettings:
    """``[retention]``: how long inputs and results are kept, and the disk's high-water marks.

    Ages of 0 keep forever; marks of 0 are off. See :mod:`dicom_node.retention`.
    """

    inputs_days: float = field(default=0.0, metadata=_check(_non_negative))
    results_days: float = field(default=0.0, metadata=_check(_non_negative))
    interval_seconds: float = field(default=3600.0, metadata=_check(_positive))
    disk_check_seconds: float = field(default=10.0, metadata=_check(_positive))
    purge_above_percent: float = field(default=0.0, metadata=_check(_percent))
    purge_below_free: ByteSize = field(default=ByteSize(0), metadata=_check(_non_negative))
    stop_above_percent: float = field(default=0.0, metadata=_check(_percent))


@dataclass(frozen=True)
class TlsSettings:
    """``[tls]``: the node's DICOM TLS identity, the CAs it trusts, and its TLS listener.

    Used by the SCP when ``node.listen`` has ``"tls"``, and by the exporter for destinations
    with ``tls = true`` (which may name CAs and a client certificate of their own).
    """

    port: int = field(default=2762, metadata=_check(_port))  # 2762: IANA's dicom-tls
    certificate: Path | None = None  # PEM, the node's certificate (chain after it)
    private_key: Path | None = None  # PEM, unencrypted
    ca_certificates: tuple[Path, ...] = ()  # PEM files of the CAs whose peers are trusted
    require_client_certificate: bool = True  # mutual TLS on the SCP
    min_version: str = field(default="TLSv1.2", metadata=_check(_tls_version))


@dataclass(frozen=True)
class ModelsSettings:
    """``[models]``: the model repository."""

    dir: Path = Path("../models")


def _executor(value: str) -> str:
    if value not in ("local", "ray"):
        raise ValueError('"local" (jobs run in the node) or "ray" (compute on a Ray cluster)')
    return value


def _device(value: str) -> str:
    if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
        raise ValueError('"auto", "cpu", "cuda" or "cuda:N"')
    return value


@dataclass(frozen=True)
class InferenceSettings:
    """``[inference]``: where and how models run."""

    device: str = field(default="auto", metadata=_check(_device))
    batch_size: int = field(default=16, metadata=_check(_positive))
    bf16: bool = False
    # torch's CPU threads (0: torch's default); results repeat bit for bit only at one count
    threads: int = field(default=0, metadata=_check(_non_negative))


@dataclass(frozen=True)
class StudySettings:
    """``[study]``: when a series counts as complete."""

    stable_seconds: float = field(default=10.0, metadata=_check(_non_negative))


@dataclass(frozen=True)
class JobsSettings:
    """``[jobs]``: retries, backoff and leases of the job queue."""

    max_attempts: int = field(default=5, metadata=_check(_positive))
    backoff_seconds: float = field(default=10.0, metadata=_check(_non_negative))
    max_backoff_seconds: float = field(default=600.0, metadata=_check(_non_negative))
    lease_seconds: float = field(default=60.0, metadata=_check(_positive))


@dataclass(frozen=True)
class ExportSettings:
    """``[export]``: sending results to the destinations (the outbox)."""

    max_attempts: int = field(default=5, metadata=_check(_positive))
    backoff_seconds: float = field(default=5.0, metadata=_check(_non_negative))
    max_backoff_seconds: float = field(default=300.0, metadata=_check(_non_negative))
    timeout_seconds: float = field(default=30.0, metadata=_check(_positive))
    poll_seconds: float = field(default=1.0, metadata=_check(_positive))
    max_unconfirmed: int = field(default=3, metadata=_check(_positive))


@dataclass(frozen=True)
class WorkersSettings:
    """``[workers]``: the threads that run jobs inside ``dicom-node serve``."""

    count: int = field(default=0, metadata=_check(_non_negative))
    poll_seconds: float = field(default=1.0, metadata=_check(_positive))
    shutdown_grace_seconds: float = field(default=30.0, metadata=_check(_non_negative))
    # "ray": preprocess, inference, gate scores and explanations run on Ray actors (issue #19)
    executor: str = field(default="local", metadata=_check(_executor))
    ray_address: str = ""  # "HOST:PORT" of the cluster's GCS, or "ray://HOST:PORT" (Ray Client)
    ray_actors_per_model: int = field(default=1, metadata=_check(_positive))
    ray_cpus_per_actor: float = field(default=1.0, metadata=_check(_positive))
    ray_gpus_per_actor: float = field(default=0.0, metadata=_check(_non_negative))
    ray_connect_seconds: float = field(default=5.0, metadata=_check(_positive))  # retry while down
    ray_call_timeout_seconds: float = field(default=600.0, metadata=_check(_positive))


@dataclass(frozen=True)
class WebSettings:
    """``[web]``: the dashboard and JSON API."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = field(default=8080, metadata=_check(_port))
    token: str = field(default="", metadata=_check(_token))
    # DICOMweb (QIDO-RS, WADO-RS, STOW-RS) under /dicom-web, same token and host rules
    dicomweb: bool = True
    # origins (or "*") whose browsers may call the node (an OHIF on another origin); none by default
    cors_origins: tuple[str, ...] = field(default=(), metadata=_check(_origin))
    # the web root as clients reach it (a reverse proxy): DICOMweb's Retrieve URLs and bulk data URIs
    public_url: str = field(default="", metadata=_check(_public_url))
    # HTTPS on web.port with the [tls] certificate and key (BCP 195 policy of dicom_node.tls)
    tls: bool = False


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: the append-only audit trail under ``data_dir/audit``."""

    max_bytes: ByteSize = field(default=ByteSize(10 * 2**20), metadata=_check(_positive))
    backups: int = field(default=10, metadata=_check(_non_negative))


@dataclass(frozen=True)
class LoggingSettings:
    """``[logging]``: what the node prints to stderr."""

    level: str = field(default="INFO", metadata=_check(_log_level))


@dataclass(frozen=True)
class Destination:
    """One ``[[destinations]]`` entry: a DICOM peer the node sends results to."""

    name: str = field(metadata=_check(_name))
    ae_title: str = field(metadata=_check(_ae_title))
    host: str = field(metadata=_check(_nonempty))
    port: int = field(metadata=_check(_peer_port))
    # None: [export].timeout_seconds; connect_timeout_seconds then defaults to timeout_seconds
    timeout_seconds: float | None = field(default=None, metadata=_check(_positive))
    connect_timeout_seconds: float | None = field(default=None, metadata=_check(_positive))
    # DICOM TLS to this destination; the [tls] table's CAs and certificate unless given here
    tls: bool = False
    tls_ca_certificates: tuple[Path, ...] = ()
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_server_name: str = ""  # the name its certificate must carry; "" = host
    tls_check_hostname: bool = True


PIPELINE_MATCH_KEYS = frozenset(
    {"modality", "body_part_examined", "sop_class_uid", "calling_ae_title", "series_description"}
)
EXPLAIN_METHODS = frozenset({"gradcam", "gradcampp", "hirescam", "cam", "lime",
                             "attention", "seggradcam",  # for segmentation models
                             "prototypes"})  # for prototype networks
OUTPUT_KINDS = frozenset({"sc", "sr", "seg", "pm", "gsps"})


def _match(value: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ValueError(f"an inline table with keys from {sorted(PIPELINE_MATCH_KEYS)}")
    unknown = set(value) - PIPELINE_MATCH_KEYS
    if unknown:
        raise ValueError(f"match keys from {sorted(PIPELINE_MATCH_KEYS)}, not {sorted(unknown)}")
    out = {}
    for key, item in value.items():
        items = [item] if isinstance(item, str) else item
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
            raise ValueError(f"match.{key} as a string or a non-empty list of non-empty strings")
        out[key] = tuple(items)
    return out


def _explain_labels(value: str) -> str:
    if value not in ("positive", "all") and not re.fullmatch(r"top-[1-9][0-9]*", value):
        raise ValueError('"positive" (at or above threshold), "all", or "top-N"')
    return value


def _one_of(allowed: frozenset[str]) -> Any:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"one of {sorted(allowed)}")
        return value

    return check


@dataclass(frozen=True)
class Pipeline:
    """One ``[[pipelines]]`` entry: which series go to which model, explained and sent how."""

    name: str = field(metadata=_check(_name))
    model: str = field(metadata=_check(_name))
    match: dict[str, tuple[str, ...]] = field(default_factory=dict, metadata=_check(_match))
    explain: tuple[str, ...] = field(default=("gradcam",), metadata=_check(_one_of(EXPLAIN_METHODS)))
    explain_labels: str = field(default="positive", metadata=_check(_explain_labels))
    lime_samples: int = field(default=1000, metadata=_check(_positive))
    outputs: tuple[str, ...] = field(default=("sc", "sr"), metadata=_check(_one_of(OUTPUT_KINDS)))
    send_to: tuple[str, ...] = ()
    reply_to_caller: bool = False
    # what a frame outside the model's validated input gets; "model": the manifest's [gate] action
    out_of_distribution: str = field(default="model",
                                     metadata=_check(_one_of(frozenset({"model", "abstain", "warn"}))))


@dataclass(frozen=True)
class Settings:
    """Everything the node is configured with; one object, loaded once."""

    source: str = "<defaults>"
    node: NodeSettings = NodeSettings()
    ingest: IngestSettings = IngestSettings()
    store: StoreSettings = StoreSettings()
    tls: TlsSettings = TlsSettings()
    models: ModelsSettings = ModelsSettings()
    inference: InferenceSettings = InferenceSettings()
    study: StudySettings = StudySettings()
    jobs: JobsSettings = JobsSettings()
    export: ExportSettings = ExportSettings()
    workers: WorkersSettings = WorkersSettings()
    web: WebSettings = WebSettings()
    logging: LoggingSettings = LoggingSettings()
    audit: AuditSettings = AuditSettings()
    retention: RetentionSettings = RetentionSettings()
    destinations: tuple[Destination, ...] = ()
    pipelines: tuple[Pipeline, ...] = ()


_SECTIONS: dict[str, type] = {
    f.name: f.type for f in dataclasses.fields(Settings)
    if isinstance(f.type, type) and dataclasses.is_dataclass(f.type)
}
_TABLE_ARRAYS: dict[str, type] = {"destinations": Destination, "pipelines": Pipeline}


@dataclass(frozen=True)
class _Value:
    """A raw value and where it came from, for error messages."""

    value: Any
    origin: str  # e.g. "config/node.toml" or "environment variable DICOM_NODE_NODE_PORT"
    base_dir: Path  # what relative paths are relative to


def _coerce(hint: Any, raw: Any) -> Any:
    """Turn a TOML (or env/flag) value into the annotated type, or raise ValueError."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(raw, list):
            raise ValueError("a list")
        (inner, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(inner, item) for item in raw)
    if origin is types.UnionType:  # an optional key (``X | None``): TOML has no null, so an X
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _coerce(inner[0], raw) if len(inner) == 1 else raw
    if origin is dict:
        return raw
    if hint is ByteSize:
        return _byte_size(raw)
    if hint is bool:
        if not isinstance(raw, bool):
            raise ValueError("true or false")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError("an integer")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise ValueError("a finite number")
        return float(raw)
    if hint in (str, Path):
        if not isinstance(raw, str) or (hint is Path and not raw):
            raise ValueError("a string" if hint is str else "a path")
        return raw
    raise TypeError(f"unsupported setting type {hint!r}")


def _byte_size(raw: Any) -> ByteSize:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return ByteSize(raw)
    match = _SIZE_RE.match(raw) if isinstance(raw, str) else None
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError('a size in bytes: an integer or a string such as "512 MiB" or "2 GB"')
    return ByteSize(int(float(match.group(1)) * _SIZE_UNITS[unit]))


def _build(cls: type, where: str, values: Mapping[str, _Value]) -> Any:
    """Build dataclass ``cls`` from ``values``; ``where`` is the TOML path of the table."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, item in values.items():
        if key not in fields:
            raise ConfigError(
                f"{item.origin}: unknown key '{where}.{key}'; "
                f"expected one of {sorted(fields)}"
            )
        try:
            value = _coerce(hints[key], item.value)
            validator = fields[key].metadata.get("validator")
            if validator is not None:
                if isinstance(value, tuple):
                    value = tuple(validator(v) for v in value)
                else:
                    value = validator(value)
            value = _resolve_paths(hints[key], value, item.base_dir)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{item.origin}: key '{where}.{key}' = {item.value!r} is invalid; expected {exc}"
            ) from None
        kwargs[key] = value
    missing = [
        name for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        origin = next(iter(values.values())).origin if values else "configuration"
        raise ConfigError(f"{origin}: table '{where}' is missing required key(s) {missing}")
    return cls(**kwargs)


def _resolve_paths(hint: Any, value: Any, base_dir: Path) -> Any:
    """Paths (alone, optional or in a list) made absolute against ``base_dir``."""
    if hint is Path:
        return (base_dir / value).resolve()
    args = typing.get_args(hint)
    if value is not None and Path in args and (typing.get_origin(hint) is types.UnionType):
        return (base_dir / value).resolve()
    if typing.get_origin(hint) is tuple and args and args[0] is Path:
        return tuple((base_dir / item).resolve() for item in value)
    return value


def _parse_scalar(text: str) -> Any:
    """Parse an env var or flag value as a TOML value, falling back to a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, _Value]]:
    out: dict[str, dict[str, _Value]] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            raise ConfigError(
                f"environment variable {name}: not a setting; expected "
                f"{ENV_PREFIX}<SECTION>_<KEY> with SECTION one of {sorted(_SECTIONS)}"
            )
        origin = f"environment variable {name}"
        out.setdefault(section, {})[key] = _Value(_parse_scalar(text), origin, Path.cwd())
    return out


def parse_assignment(text: str) -> tuple[str, Any]:
    """Split a ``--set SECTION.KEY=VALUE`` flag; VALUE is read as TOML, else as a plain string."""
    dotted, sep, raw = text.partition("=")
    section, _, key = dotted.strip().partition(".")
    if not sep or section not in _SECTIONS or not key:
        raise ConfigError(
            f"flag --set {text}: expected SECTION.KEY=VALUE with SECTION one of {sorted(_SECTIONS)}"
        )
    return f"{section}.{key}", _parse_scalar(raw.strip())


def _flag_overrides(overrides: Mapping[str, Any]) -> dict[str, dict[str, _Value]]:
    out: dict[str, dict[str, _Value]] = {}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        origin = f"command-line flag for {dotted}"
        if section not in _SECTIONS or not key:
            raise ConfigError(f"{origin}: expected SECTION.KEY with SECTION one of {sorted(_SECTIONS)}")
        out.setdefault(section, {})[key] = _Value(value, origin, Path.cwd())
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file ({exc.strerror})") from None


def load_settings(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load and validate the node's settings.

    Parameters
    ----------
    path
        The TOML file; default ``$DICOM_NODE_CONFIG`` or ``config/node.toml``.
    environ
        Environment to read ``DICOM_NODE_<SECTION>_<KEY>`` overrides from (default ``os.environ``).
    overrides
        ``{"section.key": value}`` from the command line; they win over everything.

    Raises
    ------
    ConfigError
        With one line naming the file, variable or flag, the key, the value and what was expected.
    """
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    document = _read_toml(path)
    base_dir = path.resolve().parent
    origin = str(path)

    tables: dict[str, dict[str, _Value]] = {}
    for section, content in document.items():
        if section in _TABLE_ARRAYS:
            continue
        if section not in _SECTIONS:
            allowed = sorted([*_SECTIONS, *_TABLE_ARRAYS])
            raise ConfigError(f"{origin}: unknown table '[{section}]'; expected one of {allowed}")
        if not isinstance(content, dict):
            raise ConfigError(f"{origin}: '{section}' must be a table ([{section}])")
        tables[section] = {k: _Value(v, origin, base_dir) for k, v in content.items()}
    for layer in (_env_overrides(environ), _flag_overrides(overrides or {})):
        for section, values in layer.items():
            tables.setdefault(section, {}).update(values)

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        given = tables.get(name, {})
        sections[name] = _resolve_default_paths(_build(cls, name, given), given, base_dir)
    arrays = {
        name: _build_array(cls, name, document.get(name, []), origin, base_dir)
        for name, cls in _TABLE_ARRAYS.items()
    }
    settings = Settings(source=origin, **sections, **arrays)  # type: ignore[arg-type]
    _check_references(settings)
    _check_marks(settings)
    _check_executor(settings)
    return settings


def _resolve_default_paths(built: Any, given: Mapping[str, _Value], base_dir: Path) -> Any:
    """Resolve Path settings left at their defaults against the config file's folder."""
    changes = {
        f.name: (base_dir / getattr(built, f.name)).resolve()
        for f in dataclasses.fields(built)
        if isinstance(getattr(built, f.name), Path) and f.name not in given
    }
    return dataclasses.replace(built, **changes)


def _build_array(cls: type, name: str, raw: Any, origin: str, base_dir: Path) -> tuple[Any, ...]:
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{origin}: '{name}' must be an array of tables ([[{name}]])")
    items = tuple(
        _build(cls, f"{name}[{i}]", {k: _Value(v, origin, base_dir) for k, v in table.items()})
        for i, table in enumerate(raw)
    )
    names = [item.name for item in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{origin}: [[{name}]] names must be unique; repeated: {duplicates}")
    return items


def _check_tls(settings: Settings) -> None:
    """What TLS needs beyond each key's own check: a certificate to serve, CAs to verify with."""
    src, tls = settings.source, settings.tls
    if not settings.node.listen or len(set(settings.node.listen)) != len(settings.node.listen):
        raise ConfigError(f"{src}: key 'node.listen' = {list(settings.node.listen)!r} is invalid; "
                          f"expected one or both of {sorted(LISTENERS)}, each once")
    if (tls.certificate is None) != (tls.private_key is None):
        raise ConfigError(f"{src}: keys 'tls.certificate' and 'tls.private_key' go together; "
                          "expected both or neither")
    if "tls" in settings.node.listen:
        if tls.certificate is None:
            raise ConfigError(f"{src}: key 'node.listen' has \"tls\" but 'tls.certificate' and "
                              "'tls.private_key' are not set")
        if tls.require_client_certificate and not tls.ca_certificates:
            raise ConfigError(f"{src}: key 'tls.require_client_certificate' = true needs "
                              "'tls.ca_certificates' (the CAs that issue the peers' certificates)")
        if "plain" in settings.node.listen and tls.port == settings.node.port != 0:
            raise ConfigError(f"{src}: key 'tls.port' = {tls.port} is invalid; expected a port "
                              "other than node.port when both listen")
    for i, d in enumerate(settings.destinations):
        if (d.tls_certificate is None) != (d.tls_private_key is None):
            raise ConfigError(f"{src}: keys 'destinations[{i}].tls_certificate' and "
                              "'tls_private_key' go together; expected both or neither")
        _check_destination_tls_keys(src, i, d)
        if d.tls and not (d.tls_ca_certificates or tls.ca_certificates):
            raise ConfigError(f"{src}: key 'destinations[{i}].tls' = true needs "
                              f"'destinations[{i}].tls_ca_certificates' or 'tls.ca_certificates' "
                              "(the CAs that issue the destination's certificate)")


def _check_destination_tls_keys(src: str, i: int, d: Destination) -> None:
    """A ``tls_*`` key without ``tls = true`` is a mistake, not a preference: ignoring it would
    send the results in clear to a destination its operator meant to reach over TLS."""
    set_keys = [f.name for f in dataclasses.fields(Destination)
                if f.name.startswith("tls_") and getattr(d, f.name) != f.default]
    if set_keys and not d.tls:
        raise ConfigError(f"{src}: key 'destinations[{i}].tls' = false is invalid with "
                          f"{', '.join(f'destinations[{i}].{k}' for k in set_keys)} set; expected "
                          "'tls = true' (or remove the tls_* keys to send in clear)")


def _check_references(settings: Settings) -> None:
    _check_tls(settings)
    known = {d.name for d in settings.destinations}
    for i, pipeline in enumerate(settings.pipelines):
        if not pipeline.outputs:
            raise ConfigError(f"{settings.source}: key 'pipelines[{i}].outputs' = [] is invalid; "
                              f"expected at least one of {sorted(OUTPUT_KINDS)}")
        if "sr" not in pipeline.outputs:  # the report says "not analysed" when nothing else can
            raise ConfigError(f"{settings.source}: key 'pipelines[{i}].outputs' = {list(pipeline.outputs)!r} "
                              "lacks 'sr': every routed series must get a findings or 'not analysed' report")
        unknown = [n for n in pipeline.send_to if n not in known]
        if unknown:
            raise ConfigError(
                f"{settings.source}: key 'pipelines[{i}].send_to' = {list(pipeline.send_to)!r} "
                f"is invalid; expected names of [[destinations]] {sorted(known)}, not {unknown}"
            )


#: ``HOST:PORT`` or ``ray://HOST:PORT``: a host name, IPv4 or [IPv6] address, and a port 1-65535
_RAY_ADDRESS = re.compile(r"(ray://)?([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):"
                          r"(6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})")


def _check_executor(settings: Settings) -> None:
    """``executor = "ray"`` needs the cluster's address; the ``ray_*`` keys mean nothing without it."""
    w = settings.workers
    if w.executor == "ray" and not w.ray_address.strip():
        raise ConfigError(f"{settings.source}: key 'workers.ray_address' = '' is invalid with "
                          "workers.executor = \"ray\"; expected the cluster's \"HOST:PORT\" "
                          "or \"ray://HOST:PORT\"")
    if w.ray_address.strip() and not _RAY_ADDRESS.fullmatch(w.ray_address):
        raise ConfigError(f"{settings.source}: key 'workers.ray_address' = {w.ray_address!r} is invalid; "
                          "expected the cluster's \"HOST:PORT\" or \"ray://HOST:PORT\" (port 1-65535)")


def _check_marks(settings: Settings) -> None:
    """The purge marks must come before the stop marks, or the node would refuse C-STOREs before
    it ever purged."""
    r, floor = settings.retention, settings.store.min_free_space
    if r.purge_above_percent and r.stop_above_percent and r.purge_above_percent >= r.stop_above_percent:
        raise ConfigError(f"{settings.source}: key 'retention.purge_above_percent' = {r.purge_above_percent} "
                          "is invalid; expected less than retention.stop_above_percent = "
                          f"{r.stop_above_percent}")
    if r.purge_below_free and r.purge_below_free <= floor:
        raise ConfigError(f"{settings.source}: key 'retention.purge_below_free' = {int(r.purge_below_free)} "
                          f"is invalid; expected more than store.min_free_space = {int(floor)} bytes")
