"""Training configs as users write them: YAML files whose keys are the runner CLI's option names, checked before a
run starts (unknown keys name the nearest valid one; values are type-checked against SAE-Lens' and the
architecture's config dataclasses), single runs and sweeps alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml
from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

from softsae_plugin.training.sweep import SWEEP_KEY, per_sae_fields, shared_fields

# YAML keys this command reads itself rather than passing to SAE-Lens' runner.
OWN_KEYS: dict[str, type] = {"activations": str, "skip_nonfinite_rows": bool}


def _config_fields(architecture: str) -> dict[str, Any]:
    """Every key a YAML config may hold for `architecture`, with its type: the runner CLI's flags."""
    sae_cfg_cls = SAE_TRAINING_CLASS_REGISTRY[architecture][1]
    field_types: dict[str, Any] = {"architecture": str, **OWN_KEYS}
    for cls in (LanguageModelSAERunnerConfig, LoggingConfig):
        hints = typing.get_type_hints(cls)
        field_types.update({f.name: hints[f.name] for f in fields(cls) if f.name not in ("sae", "logger")})
    hints = typing.get_type_hints(sae_cfg_cls)
    for f in fields(sae_cfg_cls):
        if f.name == "metadata":
            continue
        # The runner CLI names SAE fields that clash with runner fields "sae.<name>".
        field_types[f"sae.{f.name}" if f.name in field_types else f.name] = hints[f.name]
    return field_types


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as a string; read it as the number users mean."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789")
)


def _strict_if_scalar(tp: Any) -> Any:
    # Scalars must have their own type (no "8" for k, 1.5 or true for a step count: the runner CLI would
    # choke on them later); composite fields stay lax, since YAML has lists where SAE-Lens has tuples.
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if all(option in (int, float, bool, str, type(None)) for option in options):
        strict = [Annotated[option, pydantic.Strict()] for option in options if option is not type(None)]
        return typing.Union[(*strict, None)]
    return tp | None


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML training config; keys are the runner CLI's option names.

    Unknown keys are an error that names the key and the nearest valid one; values are type-checked
    with pydantic against SAE-Lens' and softsae's config dataclasses (scalars strictly, numbers finite).
    Limits that depend on the run's length (hard_topk_steps) are checked when the run starts.
    """
    data = yaml.load(Path(path).read_text(), Loader=_YamlLoader) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    architecture = data.get("architecture", "standard")
    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"{path}: architecture={architecture!r} is not registered; "
            f"expected one of {sorted(SAE_TRAINING_CLASS_REGISTRY)}"
        )
    return validate_options(data, _config_fields(architecture), f"{path}", f"architecture {architecture!r}")


def validate_options(data: dict[str, Any], valid: dict[str, Any], where: str, what: str) -> dict[str, Any]:
    """Check `data` against `valid` (option name -> type): an unknown key names the nearest valid one, and values
    are type-checked with pydantic (scalars strictly, numbers finite). Returns `data`."""
    for key in data:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{where}: unknown key {key!r} for {what}{hint}")
    model = pydantic.create_model(  # type: ignore[call-overload]
        "TrainConfig",
        __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=False, allow_inf_nan=False),
        **{name.replace(".", "__"): (_strict_if_scalar(tp), None) for name, tp in valid.items()},
    )
    try:
        model.model_validate({k.replace(".", "__"): v for k, v in data.items()})
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).replace('__', '.')}={e.get('input')!r}: {e['msg']}"
            for e in err.errors()
        )
        raise ValueError(f"{where}: {problems}") from None
    return data


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and validate a sweep config (a `saes:` mapping beside shared runner options), with `--key value`
    command-line overrides of the shared options; returns (shared options, name -> the SAE's options)."""
    data = yaml.load(Path(path).read_text(), Loader=_YamlLoader) or {}
    saes = data.pop(SWEEP_KEY)
    if not isinstance(saes, dict) or not saes or not all(isinstance(v, dict) for v in saes.values()):
        raise ValueError(f"{path}: {SWEEP_KEY} must map each SAE's name to its options (architecture, k, lr, ...)")
    if len(overrides) % 2 or not all(key.startswith("--") for key in overrides[::2]):
        raise ValueError(f"a sweep takes shared options as --name value pairs; got {list(overrides)}")
    for key, value in zip(overrides[::2], overrides[1::2], strict=True):
        data[key.removeprefix("--")] = yaml.load(value, Loader=_YamlLoader)
    validate_options(data, {**shared_fields(), **OWN_KEYS}, f"{path}", "a sweep's shared options")
    for name, options in saes.items():
        architecture = options.get("architecture", "standard")
        if architecture not in SAE_TRAINING_CLASS_REGISTRY:
            raise ValueError(
                f"{path}: saes.{name}.architecture={architecture!r} is not registered; "
                f"expected one of {sorted(SAE_TRAINING_CLASS_REGISTRY)}"
            )
        validate_options(
            options, per_sae_fields(architecture), f"{path}: saes.{name}", f"architecture {architecture!r}"
        )
    return data, saes


def config_to_args(config: dict[str, Any]) -> list[str]:
    """Turn a validated config mapping into runner CLI arguments (null values are set by `apply_nulls`)."""
    args: list[str] = []
    for key, value in config.items():
        if key in OWN_KEYS or value is None:
            continue
        if isinstance(value, bool):
            args += [f"--{key}", str(value).lower()]
        elif isinstance(value, dict):
            args += [f"--{key}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            args += [f"--{key}", *map(str, value)]
        else:
            args += [f"--{key}", str(value)]
    return args


def apply_nulls(cfg: LanguageModelSAERunnerConfig[Any], config: dict[str, Any]) -> None:
    """Set the config's null values, which the runner CLI cannot express (it has no spelling for None)."""
    sae_fields = {f.name for f in fields(cfg.sae)}
    for key, value in config.items():
        if value is not None or key == "architecture" or key in OWN_KEYS:
            continue
        name = key.removeprefix("sae.")
        if key.startswith("sae.") or (name in sae_fields and not hasattr(cfg, name)):
            cfg.sae = dataclasses.replace(cfg.sae, **{name: None})
        elif hasattr(cfg.logger, name):
            setattr(cfg.logger, name, None)
        else:
            setattr(cfg, name, None)


def is_sweep_config(path: str | Path) -> bool:
    """Whether the YAML file at `path` describes a sweep (a `saes:` mapping) rather than a single run."""
    data = yaml.load(Path(path).read_text(), Loader=_YamlLoader)
    return isinstance(data, dict) and SWEEP_KEY in data
