"""Load and validate manifests and config/ files, and merge the layers into one JobSettings.

Precedence, highest first: command-line flags > manifest > config/ file > the AWS environment
people already have (:class:`AwsEnvironment`, read by the CLI: ``AWS_REGION``, ``AWS_DEFAULT_REGION``,
the profile's region; only for ``backend: bedrock``) > built-in defaults (:data:`BUILTIN_DEFAULTS`,
so an installed package works without the repo). Each layer is
validated on its own, so an error names the file *and* the key path
(``limits.concurrency: must be ≥ 1, got 0``); every problem is reported, not just the first.
YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batch_upscaler.catalogue import BUILTIN, ModelName, ModelOverride, apply_override, check_params
from batch_upscaler.errors import ManifestError
from batch_upscaler.naming import DEFAULT_TEMPLATE, template_problem
from batch_upscaler.settings import (
    AlphaPolicy,
    AspectPolicy,
    AwsSources,
    Backend,
    EmulatorSettings,
    JobSettings,
    Limits,
    MetadataSettings,
    NameCompare,
    OutputFormat,
    Oversize,
    PrepareSettings,
    S3Settings,
    Undersize,
)
from batch_upscaler.shards import Shard
from batch_upscaler.storage.urls import Location, is_s3, parse_s3, s3_url_problem

Check = Callable[[Any], str | None]

# Deployment defaults; config/batch-upscaler.yaml in the repo documents and may override them.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "backend": "bedrock",
    "output": {"format": "png", "name_compare": "casefold", "shared": False},
    "bedrock": {"region": "us-east-1", "endpoint_url": None, "profile": None, "quotas_endpoint_url": None},
    "limits": {"concurrency": 4, "requests_per_minute": 30, "max_attempts": 6,
               "read_timeout_s": 300, "connect_timeout_s": 10, "backoff_base_s": 2, "backoff_max_s": 60,
               "retry_after_max_s": 60, "possibly_billed_resends": 1, "outage_errors": 8, "outage_wait": "15m",
               "remembered_rate_max_age": "7d", "quota_lookup": True, "quota_code": None},
    "region_prefixes": {"us-east-1": "us", "us-east-2": "us", "us-west-2": "us"},
    "models": {},
    "emulator": {"output_max_pixels": None, "latency_s": 0, "quota_rpm": None},
    "s3": {"region": None, "endpoint_url": None, "profile": None, "checksums": "when_supported"},
    "shards": {"count": 1, "share_every": "10s"},
    "prepare": {"orientation": "apply", "oversize": "downscale", "undersize": "skip", "aspect": "pad",
                "alpha": "flatten", "background": "#ffffff", "min_gain": 1.0},
}


@dataclass(frozen=True)
class Key:
    """A schema node: a leaf with a check, or a section with children."""

    check: Check | None = None
    required: bool = False
    children: Mapping[str, Key] | None = None
    any_keys: Key | None = None  # a section whose keys are free-form, each value checked by this


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_str(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {_type_name(value)}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def number(low: float | None = None, high: float | None = None, *, whole: bool = False,
           above: float | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return f"must be a {'whole ' if whole else ''}number, got {_type_name(v)} {v!r}"
        if whole and not float(v).is_integer():
            return f"must be a whole number, got {v}"
        if low is not None and v < low:
            return f"must be ≥ {low:g}, got {v:g}"
        if high is not None and v > high:
            return f"must be ≤ {high:g}, got {v:g}"
        if above is not None and v <= above:
            return f"must be > {above:g}, got {v:g}"
        return None
    return check


def choice(*values: str) -> Check:
    return lambda v: None if v in values else f"must be one of {', '.join(values)}, got {v!r}"


def str_list(*, non_empty: bool, each: Check | None = None) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list) or (non_empty and not v):
            return f"must be a {'non-empty ' if non_empty else ''}list of strings, got {_type_name(v)}"
        bad = [i for i, item in enumerate(v) if is_str(item)]
        if bad:
            return f"item {bad[0]} must be a non-empty string, got {_type_name(v[bad[0]])}"
        problems = [(i, why) for i, item in enumerate(v) if each is not None and (why := each(item))]
        return f"item {problems[0][0]}: {problems[0][1]}" if problems else None
    return check


def location(v: Any) -> str | None:
    """A local path, or an ``s3://bucket/key`` URL whose bucket part is valid (no glob in it)."""
    return is_str(v) or (s3_url_problem(v) if is_s3(v) else None)


def local_path(v: Any) -> str | None:
    return is_str(v) or ("must be a local folder (the checkpoint and the lock live here), not an S3 URL"
                         if is_s3(v) else None)


def quota_code(v: Any) -> str | None:
    """A Service Quotas code such as ``L-1A2B3C4D``."""
    if isinstance(v, str) and re.fullmatch(r"L-[0-9A-F]{8}", v):
        return None
    return f"must be a Service Quotas code like L-1A2B3C4D, got {v!r}"


def job_name(v: Any) -> str | None:
    if isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
        return None
    return f"must be 1-64 letters, digits, '.', '_' or '-' (it names files), got {v!r}"


def parse_duration(value: float | int | str) -> float:
    """Seconds from a number, or from text such as '3600', '90s', '45m', '6h', '1h30m' or '7d'."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"not a duration: {value!r}")
        return float(value)
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
                         r"(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or match is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. 3600, 90m, 5h30m, 7d)")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def duration(v: Any) -> str | None:
    try:
        parse_duration(v)
    except (ValueError, TypeError):
        return f"must be a duration such as 900, 90s, 15m or 1h30m, got {v!r}"
    return None


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {_type_name(v)} {v!r}"


def colour(v: Any) -> str | None:
    if isinstance(v, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", v):
        return None
    return f"must be a colour like '#ffffff', got {v!r}"


def naming_template(v: Any) -> str | None:
    return is_str(v) or template_problem(v)


def url(v: Any) -> str | None:
    if isinstance(v, str) and re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
        return None
    return f"must be an http(s) URL, got {v!r}"


_LIMITS = {
    "concurrency": Key(number(1, 512, whole=True)),
    "requests_per_minute": Key(lambda v: None if v == "auto" else number(above=0)(v)),
    "max_attempts": Key(number(1, 50, whole=True)),
    "read_timeout_s": Key(number(above=0)),
    "connect_timeout_s": Key(number(above=0)),
    "backoff_base_s": Key(number(0)),
    "backoff_max_s": Key(number(0)),
    "max_cost_usd": Key(optional(number(0))),
    "retry_after_max_s": Key(number(0)),
    "possibly_billed_resends": Key(number(0, 10, whole=True)),
    "outage_errors": Key(number(1, whole=True)),
    "outage_wait": Key(duration),
    "shard_rpm": Key(optional(number(above=0))),
    "remembered_rate_max_age": Key(duration),
    "quota_lookup": Key(boolean),
    "quota_code": Key(optional(quota_code)),
}
_BEDROCK = {"region": Key(is_str), "endpoint_url": Key(optional(url)), "profile": Key(optional(is_str)),
            "quotas_endpoint_url": Key(optional(url))}
_EMULATOR = {
    "output_max_pixels": Key(optional(number(1, whole=True))),
    "latency_s": Key(number(0)),
    "quota_rpm": Key(optional(number(above=0))),
}
_SHARDS = {"count": Key(number(1, 10_000, whole=True)), "at_once": Key(optional(number(1, 10_000, whole=True))),
           "share_every": Key(duration)}
_S3 = {"region": Key(optional(is_str)), "endpoint_url": Key(optional(url)), "profile": Key(optional(is_str)),
       "checksums": Key(choice("when_supported", "when_required"))}
_MODEL_PARAMS = ("prompt", "negative_prompt", "seed", "creativity", "style_preset")

MANIFEST_SCHEMA: Mapping[str, Key] = {
    "version": Key(lambda v: None if v == 1 and not isinstance(v, bool) else f"must be 1, got {v!r}",
                   required=True),
    "name": Key(job_name, required=True),
    "sources": Key(str_list(non_empty=True, each=location), required=True),
    "exclude": Key(str_list(non_empty=False)),
    "output": Key(required=True, children={
        "dir": Key(location, required=True),
        "format": Key(choice(*OutputFormat)),
        "naming": Key(naming_template),
        "name_compare": Key(choice(*NameCompare)),
        "shared": Key(boolean),
        "metadata": Key(children={k: Key(boolean) for k in ("exif", "gps", "icc", "mtime", "send_metadata")}),
    }),
    "prepare": Key(children={
        "orientation": Key(choice("apply", "keep")),
        "oversize": Key(choice(*Oversize)),
        "undersize": Key(choice(*Undersize)),
        "aspect": Key(choice(*AspectPolicy)),
        "alpha": Key(choice(*AlphaPolicy)),
        "background": Key(colour),
        "min_gain": Key(number(above=0)),
    }),
    # Parameter values are checked against the model catalogue after merging (see _check_model).
    "model": Key(required=True, children={"name": Key(choice(*ModelName), required=True),
                                          **{p: Key() for p in _MODEL_PARAMS}}),
    "backend": Key(choice(*Backend)),
    "bedrock": Key(children=_BEDROCK),
    "limits": Key(children=_LIMITS),
    "emulator": Key(children=_EMULATOR),
    "state_dir": Key(optional(local_path)),
    "report_dir": Key(optional(location)),
    "s3": Key(children=_S3),
    "shards": Key(children=_SHARDS),
}
_OVERRIDE = {"max_pixels": Key(number(1, whole=True)), "creativity_min": Key(number(0, 1)),
             "price_usd": Key(number(0))}
CONFIG_SCHEMA: Mapping[str, Key] = {
    "backend": Key(choice(*Backend)),
    "prepare": MANIFEST_SCHEMA["prepare"],
    "bedrock": Key(children=_BEDROCK),
    "limits": Key(children=_LIMITS),
    "emulator": Key(children=_EMULATOR),
    "s3": Key(children=_S3),
    "shards": Key(children=_SHARDS),
    "region_prefixes": Key(any_keys=Key(is_str)),
    "models": Key(children={m.value: Key(children=_OVERRIDE) for m in ModelName}),
}


def validate(doc: Any, schema: Mapping[str, Key], path: str = "") -> list[str]:
    """Every problem in ``doc`` against ``schema``, each prefixed with its key path."""
    where = path or "(top level)"
    if not isinstance(doc, dict):
        return [f"{where}: must be a mapping, got {_type_name(doc)}"]
    problems = [f"{_join(path, str(k))}: unknown key" for k in doc if k not in schema]
    for name, key in schema.items():
        if name not in doc:
            if key.required:
                problems.append(f"{_join(path, name)}: is required")
            continue
        problems += _validate_key(doc[name], key, _join(path, name))
    return problems


def _validate_key(value: Any, key: Key, path: str) -> list[str]:
    if key.children is not None:
        return validate(value, key.children, path)
    if key.any_keys is not None:
        if not isinstance(value, dict):
            return [f"{path}: must be a mapping, got {_type_name(value)}"]
        return [p for k, v in value.items() for p in _validate_key(v, key.any_keys, _join(path, str(k)))]
    problem = key.check(value) if key.check else None
    return [f"{path}: {problem}"] if problem else []


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def load_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file safely; unreadable or malformed files are a ManifestError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(str(path), [f"cannot read {what}: {exc}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # PyYAML's own lines: "line N, column M:", the source line and a caret under the column.
        # They stay separate lines (ManifestError indents every line alike, so the caret still points).
        for mark in (getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)):
            if mark is not None:
                mark.name = str(path)  # instead of "<unicode string>"
        raise ManifestError(str(path), [f"not valid YAML (or uses tags that build objects):\n{exc}"]) from None


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; nested mappings merge key by key, everything else is replaced."""
    merged = dict(base)
    for k, v in top.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


@dataclass(frozen=True)
class Layers:
    """The raw layers before merging, each already validated against its schema."""

    manifest_path: Path
    manifest: Mapping[str, Any]
    config: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, Any] = field(default_factory=dict)
    config_path: Path | None = None
    manifest_source: str | None = None  # what errors in the manifest layer name (default: its path)

    def configured(self, section: str, key: str) -> tuple[Any, str | None]:
        """A key's value in the highest layer that sets it (not null), and that layer's name; else (None, None)."""
        for name, layer in (("flag", self.flags), ("manifest", self.manifest), ("config file", self.config)):
            value = (layer.get(section) or {}).get(key)
            if value is not None:
                return value, f"--{key.replace('_', '-')}" if name == "flag" else name
        return None, None


@dataclass(frozen=True)
class AwsEnvironment:
    """The AWS set-up people already have, as the CLI read it: the layer between the config file and
    the built-ins (for ``backend: bedrock`` only; the embedded emulator needs no AWS set-up).

    Only the region becomes a setting. The profile and the endpoint stay unset in JobSettings, so
    botocore resolves them itself, exactly as for any other AWS tool; they are kept here to be shown.
    """

    region: str | None = None
    region_source: str = "default"  # AWS_REGION, AWS_DEFAULT_REGION or "profile NAME"
    profile: str | None = None  # the profile botocore uses when bedrock.profile is unset (AWS_PROFILE)
    endpoint_url: str | None = None  # the bedrock-runtime endpoint botocore will read from the environment
    endpoint_source: str = "default"  # AWS_ENDPOINT_URL_BEDROCK_RUNTIME or AWS_ENDPOINT_URL


def read_config(config_path: Path | None) -> Mapping[str, Any]:
    """The deployment config file's layer, validated; empty without a file."""
    if config_path is None:
        return {}
    config = load_yaml(config_path, "config file") or {}
    problems = validate(config, CONFIG_SCHEMA)
    if problems:
        raise ManifestError(str(config_path), problems)
    return dict(config)


def read_layers(manifest_path: Path, config_path: Path | None, flags: Mapping[str, Any]) -> Layers:
    """Read and validate the manifest, the optional config file and the flag overrides."""
    manifest = load_yaml(manifest_path, "manifest")
    problems = validate(manifest, MANIFEST_SCHEMA)
    if problems:
        raise ManifestError(str(manifest_path), problems)
    config = read_config(config_path)
    problems = validate(dict(flags), dict(MANIFEST_SCHEMA) | {"version": Key(), "name": Key(),
                                                        "sources": Key(), "output": Key(), "model": Key()})
    if problems:
        raise ManifestError("command line", problems)
    return Layers(manifest_path, manifest, config, flags, config_path)


def configured_profile(layers: Layers) -> str | None:
    """``bedrock.profile`` from flags, manifest or config file: the profile whose region the CLI reads."""
    profile, _ = layers.configured("bedrock", "profile")
    return str(profile) if profile is not None else None


def build_settings(layers: Layers, aws: AwsEnvironment | None = None) -> JobSettings:
    """Merge flags > manifest > config > AWS environment > built-ins into one validated JobSettings."""
    aws = aws or AwsEnvironment()
    merged = _merge(BUILTIN_DEFAULTS, layers.config, layers.manifest, layers.flags)
    on_aws = merged["backend"] == Backend.BEDROCK
    if on_aws and aws.region:
        merged = _merge(BUILTIN_DEFAULTS, {"bedrock": {"region": aws.region}}, layers.config, layers.manifest,
                        layers.flags)
    where = layers.manifest_source or str(layers.manifest_path)
    spec = apply_override(BUILTIN[ModelName(merged["model"]["name"])],
                          ModelOverride(**merged["models"].get(merged["model"]["name"], {})))
    params = {k: v for k, v in merged["model"].items() if k != "name"}
    # output_format is per item (``same``); validate the model's other parameters with a stand-in.
    problems = [f"model.{name}: {why}" for name, why in check_params(spec, {**params, "output_format": "png"})]
    sources = _aws_sources(layers, aws if on_aws else AwsEnvironment(), merged)
    region = merged["bedrock"]["region"]
    prefix = merged["region_prefixes"].get(region)
    if prefix is None:
        source, problem = _region_problem(layers, sources.region, region)
        if source != where and not problems:
            raise ManifestError(source, [problem])
        problems.append(problem if source == where else f"{problem} ({source})")
    if problems:
        raise ManifestError(where, problems)
    return _assemble(layers.manifest_path, merged, spec, params, prefix, sources)


def _merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    return merged


def _aws_sources(layers: Layers, aws: AwsEnvironment, merged: dict[str, Any]) -> AwsSources:
    """Where the region, endpoint and profile in use come from (for plan, run and doctor to show)."""
    _, region_from = layers.configured("bedrock", "region")
    endpoint, endpoint_from = layers.configured("bedrock", "endpoint_url")
    profile, _ = layers.configured("bedrock", "profile")
    if endpoint is None or merged["bedrock"]["endpoint_url"] is None:  # a manifest's null beats a config's URL
        endpoint, endpoint_from = aws.endpoint_url, aws.endpoint_source
    if merged["backend"] != Backend.BEDROCK:
        endpoint, endpoint_from = None, "embedded emulator"
    return AwsSources(region=region_from or (aws.region_source if aws.region else "default"),
                      endpoint_url=endpoint, endpoint=endpoint_from or "default",
                      profile=profile if profile is not None else aws.profile)


def _region_problem(layers: Layers, source: str, region: str) -> tuple[str, str]:
    """The error for a region without an inference-profile prefix, and what it names: where the region was set."""
    unknown = f"no inference-profile prefix is known for {region!r}"
    add = "add it under region_prefixes in the config file"
    instead = f"set bedrock.region (or --region) to a region that has one, or {add}"
    if source == "--region":
        return "command line", f"--region {region}: {unknown}; {add}"
    if source in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        return "AWS environment", f"{source}={region}: {unknown}; {instead}"
    if source.startswith("profile "):
        return "AWS config file", f"region {region} of AWS {source}: {unknown}; {instead}"
    if source == "config file" and layers.config_path is not None:
        return str(layers.config_path), f"bedrock.region: {unknown}; {add}"
    return layers.manifest_source or str(layers.manifest_path), f"bedrock.region: {unknown}; {add}"


def _assemble(manifest_path: Path, merged: dict[str, Any], spec: Any, params: dict[str, Any],
              prefix: str | None, sources: AwsSources) -> JobSettings:
    base_dir = manifest_path.resolve().parent
    state_dir = _resolve_local(base_dir, merged.get("state_dir") or ".batch-upscaler")
    # The default keeps jobs that share a state_dir apart; an explicit report_dir is used as is.
    report_dir = (_resolve(base_dir, merged["report_dir"]) if merged.get("report_dir")
                  else state_dir / "reports" / merged["name"])
    lim = merged["limits"]
    rpm = lim["requests_per_minute"]
    limits = Limits(concurrency=int(lim["concurrency"]), requests_per_minute=None if rpm == "auto" else float(rpm),
                    max_attempts=int(lim["max_attempts"]), read_timeout_s=float(lim["read_timeout_s"]),
                    connect_timeout_s=float(lim["connect_timeout_s"]), backoff_base_s=float(lim["backoff_base_s"]),
                    backoff_max_s=float(lim["backoff_max_s"]),
                    max_cost_usd=None if lim.get("max_cost_usd") is None else float(lim["max_cost_usd"]),
                    retry_after_max_s=float(lim["retry_after_max_s"]),
                    possibly_billed_resends=int(lim["possibly_billed_resends"]),
                    outage_errors=int(lim["outage_errors"]), outage_wait_s=parse_duration(lim["outage_wait"]),
                    shard_rpm=None if lim.get("shard_rpm") is None else float(lim["shard_rpm"]),
                    remembered_rate_max_age_s=parse_duration(lim["remembered_rate_max_age"]),
                    quota_lookup=bool(lim["quota_lookup"]), quota_code=lim.get("quota_code"))
    return JobSettings(
        name=merged["name"],
        manifest_path=manifest_path.resolve(),
        base_dir=base_dir,
        sources=tuple(merged["sources"]),
        exclude=tuple(merged.get("exclude") or ()),
        output_dir=_resolve(base_dir, merged["output"]["dir"]),
        output_format=OutputFormat(merged["output"]["format"]),
        model=spec,
        model_id=spec.profile_id(prefix),
        params=params,
        backend=Backend(merged["backend"]),
        region=merged["bedrock"]["region"],
        endpoint_url=merged["bedrock"]["endpoint_url"],
        quotas_endpoint_url=merged["bedrock"].get("quotas_endpoint_url"),
        profile=merged["bedrock"]["profile"],
        aws=sources,
        limits=limits,
        state_dir=state_dir,
        report_root=report_dir,
        s3=S3Settings(**merged["s3"]),
        shard=Shard(0, int(merged["shards"]["count"]),
                    None if merged["shards"].get("at_once") is None else int(merged["shards"]["at_once"]),
                    parse_duration(merged["shards"]["share_every"])),
        emulator=EmulatorSettings(**merged["emulator"]),
        naming=merged["output"].get("naming", DEFAULT_TEMPLATE),
        name_compare=NameCompare(merged["output"]["name_compare"]),
        output_shared=bool(merged["output"]["shared"]),
        prepare=_prepare(merged["prepare"]),
        metadata=MetadataSettings(**merged["output"].get("metadata", {})),
    )


def _prepare(section: dict[str, Any]) -> PrepareSettings:
    rgb = section["background"].lstrip("#")
    return PrepareSettings(
        apply_orientation=section["orientation"] == "apply",
        oversize=Oversize(section["oversize"]),
        undersize=Undersize(section["undersize"]),
        aspect=AspectPolicy(section["aspect"]),
        alpha=AlphaPolicy(section["alpha"]),
        background=(int(rgb[0:2], 16), int(rgb[2:4], 16), int(rgb[4:6], 16)),
        min_gain=float(section["min_gain"]),
    )


def _resolve(base_dir: Path, value: str) -> Location:
    """A local path (relative ones from the manifest's folder) or an S3 URL, as written."""
    return parse_s3(value) if is_s3(value) else _resolve_local(base_dir, value)


def _resolve_local(base_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def default_layers(model: str, config_path: Path | None, bedrock: Mapping[str, Any]) -> Layers:
    """The layers of commands that need no job (``doctor`` without a manifest): built-ins, config, flags.

    The stand-in manifest comes from the command line (``--model``), and errors say so: there is no file.
    """
    stand_in = {"version": 1, "name": "doctor", "sources": ["."], "output": {"dir": "."},
                "model": {"name": model} | ({"prompt": "x"} if model != ModelName.FAST else {}),
                "backend": "bedrock"}
    flags = {"bedrock": dict(bedrock)} if bedrock else {}
    return Layers(Path.cwd() / "doctor.yaml", stand_in, read_config(config_path), flags, config_path,
                  manifest_source="command line")


def manifest_layers(manifest_path: Path, config_path: Path | None = None,
                    flags: Mapping[str, Any] | None = None) -> Layers:
    """Every layer of a job, read and validated (the manifest must exist)."""
    if not manifest_path.is_file():
        raise ManifestError(str(manifest_path), ["manifest file not found"])
    return read_layers(manifest_path, config_path, flags or {})


def load_settings(manifest_path: Path, config_path: Path | None = None,
                  flags: Mapping[str, Any] | None = None, aws: AwsEnvironment | None = None) -> JobSettings:
    """Read every layer, validate, merge and resolve (the CLI reads ``aws`` first: see :func:`configured_profile`)."""
    return build_settings(manifest_layers(manifest_path, config_path, flags), aws)
