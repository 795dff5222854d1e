"""Reading and writing configs: YAML presets with `key=value` overrides (strict), and saved configs (lenient).

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=7", "optim.lr=1e-3"])   # a preset: strict
    cfg = load_saved_config(checkpoint / "config.yaml")                              # a saved config: lenient

A preset is what a user writes: an unknown key or a wrong type is a ConfigError naming the key (and the closest valid
one), and impossible values are rejected by `validate` with a one-line reason. A saved config is what an earlier version
of this project wrote (a run's or a checkpoint's config.yaml, an export's): read leniently, so that a renamed or added
key never makes an old checkpoint unloadable. Every saved config carries `config_version`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from smollm2.config.schema import Choice, Config, ModelConfig
from smollm2.errors import ConfigError

# The version of the saved-config layout (to_yaml / to_dict write it). 1: the first with a version; configs saved before
# it have none. Raise it when a key is renamed or changes meaning, and teach `load_saved_config` the old name.
CONFIG_VERSION = 1
VERSION_KEY = "config_version"


def _valid_keys(cls: type, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of the schema -> whether it is a section (a nested dataclass)."""
    keys: dict[str, bool] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        sub = f.default_factory
        nested = isinstance(sub, type) and dataclasses.is_dataclass(sub)
        keys[name] = nested
        if nested:
            keys.update(_valid_keys(sub, name + "."))
    return keys


_KEYS = _valid_keys(Config)


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        out: list[tuple[str, Any]] = []
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and _KEYS.get(key, False):
                out.extend(_flatten(v, key + "."))
            else:
                out.append((key, v))
        return out
    return [(prefix.rstrip("."), tree)]


def _check_key(key: str, where: str) -> None:
    if key in _KEYS and not _KEYS[key]:
        return
    if key in _KEYS:  # a section given a scalar
        raise ConfigError(f"{where}: '{key}' is a section, not a value; set one of its keys, e.g. '{key}.<name>=...'")
    close = difflib.get_close_matches(key, [k for k, nested in _KEYS.items() if not nested], n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see smollm2/config/schema.py for the valid keys"
    raise ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _field_type(key: str) -> Any:
    """The schema's type of a dotted key (None if it is not a field)."""
    cls: Any = Config
    for part in key.split("."):
        types = {f.name: f.type for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in types:
            return None
        cls = typing.get_type_hints(cls)[part]
    return cls


def _bad_value(key: str, err: Exception) -> str:
    """One line naming the key and what it accepts."""
    kind = _field_type(key)
    value = getattr(err, "value", None)
    if isinstance(kind, type) and issubclass(kind, Choice):
        return f"invalid config: {key} must be one of {', '.join(c.value for c in kind)} (got {value!r})"
    if kind == (bool | None):
        return f"invalid config: {key} must be true, false or null (null = auto) (got {value!r})"
    return f"bad value for '{key}': {str(err).splitlines()[0]}"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except OmegaConfBaseException as err:  # YAML syntax
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError and friends
        raise ConfigError(f"{path}: cannot parse YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    return raw


def _version(raw: dict[str, Any], where: str) -> int:
    """The saved-config version a mapping declares (0: none, saved before versions), removed from it."""
    version = raw.pop(VERSION_KEY, 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError(f"{where}: {VERSION_KEY} must be a whole number (got {version!r})")
    return version


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset <- `key=value` overrides, then validation. A saved config.yaml works as a preset too."""
    layers = []
    if path is not None:
        raw = _read_yaml(Path(path))
        if (version := _version(raw, str(path))) > CONFIG_VERSION:
            raise ConfigError(f"{path} was written by a newer smollm2 (config_version {version}); this one reads up to "
                              f"{CONFIG_VERSION}: upgrade smollm2")
        for key, _ in _flatten(raw):
            _check_key(key, str(path))
        layers.append((str(path), OmegaConf.create(raw)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
        key = item.split("=", 1)[0].strip().lstrip("+")
        _check_key(key, "command line")
        try:
            layers.append((f"override '{item}'", OmegaConf.from_dotlist([item.lstrip("+")])))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from None
    merged = OmegaConf.structured(Config)
    for where, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            raise ConfigError(f"{where}: {_bad_value(key, err)}") from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:  # an interpolation that does not resolve: ${nope}, ${oc.env:UNSET}
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"invalid config: {key} is an interpolation that does not resolve ({str(err).splitlines()[0]})"
                          ) from None
    validate(cfg)
    return cfg


def load_saved_config(source: str | Path | dict[str, Any], where: str | None = None, *, section: type = Config,
                      quiet: bool = False) -> Any:
    """A config this project saved, read leniently: keys this version does not know, and values it no longer accepts,
    are dropped with one warning naming them (quiet=False); missing keys take their defaults. `source`: a YAML file or
    the mapping itself (meta.json's "config"); `section`: Config, or ModelConfig for meta.json's "model". A result that
    breaks a constraint across keys is a ConfigError naming `where`."""
    where = where or str(source if not isinstance(source, dict) else "saved config")
    raw = _read_yaml(Path(source)) if not isinstance(source, dict) else dict(source)
    version = _version(raw, where)
    merged = OmegaConf.structured(section)
    known = _KEYS if section is Config else {k.split(".", 1)[1]: v for k, v in _KEYS.items() if k.startswith("model.")}
    dropped = []
    for key, value in _flatten(raw) if section is Config else raw.items():
        if key not in known or known[key]:
            dropped.append(key)
            continue
        try:
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException:
            dropped.append(f"{key}={value!r}")
    if dropped and not quiet:
        newer = f" (written by a newer smollm2: config_version {version})" if version > CONFIG_VERSION else ""
        print(f"warning: {where}: ignoring what this version does not know{newer}: {', '.join(dropped)}",
              file=sys.stderr, flush=True)
    result = OmegaConf.to_object(merged)
    try:
        result.check()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return result


def validate(cfg: Config) -> None:
    """Every constraint of every section (each sits next to its fields, in the section's `check`)."""
    cfg.check()


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (choices as their strings): for JSON, meta.json and WandB. A whole Config carries its config_version."""
    data = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    return {VERSION_KEY: CONFIG_VERSION, **data} if isinstance(cfg, Config) else data  # type: ignore[dict-item]


def to_yaml(cfg: Config) -> str:
    return f"{VERSION_KEY}: {CONFIG_VERSION}\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg))


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A checkpoint's saved model section (meta.json's "model"), read as leniently as `load_saved_config`, quietly."""
    return load_saved_config(data, "model", section=ModelConfig, quiet=True)
