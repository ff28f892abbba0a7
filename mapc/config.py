"""Compile configuration: dataclasses loaded from TOML, then overridden by CLI flags.

Precedence: built-in defaults < TOML file < command-line flags. Relative paths
in a TOML file are relative to that file's folder, so a config can travel
with its data. Unknown keys are errors (a typo must not silently fall back to
a default). Nothing is read from environment variables.

TOML layout::

    model = "models/digits_cnn.pt2"        # optional if given on the command line
    arch = "package.module:factory"        # state_dict models only
    mode = "source-available"              # optional; inferred from the data given
    seed = 0
    device = "auto"                        # auto | cpu | cuda

    [preprocess]                           # size, channels, mean, std
    [authorized]    NAME = "path.npz"
    [unauthorized]  NAME = "path.npz"
    [mask]                                 # see mapc.masking.MaskConfig
    [gates]                                # max_source_drop, max_target_acc, min_target_drop
    [synthesis]                            # source-free/data-free: see mapc.synthesis.SynthesisConfig
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import UserError
from .gates import Gates
from .masking import MaskConfig
from .synthesis import SynthesisConfig
from .preprocess import Preprocess, preprocess_from

MODES = ("source-available", "source-free", "data-free")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class CompileConfig:
    model: str | None = None
    arch: str | None = None
    trust_pickle: bool = False
    mode: str | None = None
    seed: int = 0
    device: str = "auto"
    authorized: dict[str, str] = field(default_factory=dict)
    unauthorized: dict[str, str] = field(default_factory=dict)
    preprocess: Preprocess = field(default_factory=Preprocess)
    mask: MaskConfig = field(default_factory=MaskConfig)
    gates: Gates = field(default_factory=lambda: Gates(max_source_drop=1.0))
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    skip_passes: list[str] = field(default_factory=list)

    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        if self.authorized and self.unauthorized:
            return "source-available"
        if self.unauthorized:
            return "source-free"
        if not self.authorized:
            return "data-free"
        raise UserError("only authorized data given: add --unauthorized NAME=PATH (source-available), or pass "
                        "--mode data-free to synthesize everything and use the data only to measure")


def _table(cls, d: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise UserError(f"{where}: {e}")


def load_config(path: str | Path) -> CompileConfig:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: config file not found")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid TOML ({e})")
    base = p.resolve().parent

    def rel(v: str) -> str:
        if not isinstance(v, str):
            raise UserError(f"{p}: paths must be strings, got {v!r}")
        q = Path(v)
        return str(q if q.is_absolute() else base / q)

    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    known_top = {"model", "arch", "trust_pickle", "mode", "seed", "device", "skip_passes"}
    known_tables = {"preprocess", "authorized", "unauthorized", "mask", "gates", "synthesis"}
    unknown = (set(top) - known_top) | ({k for k, v in raw.items() if isinstance(v, dict)} - known_tables)
    if unknown:
        raise UserError(f"{p}: unknown keys {sorted(unknown)}; known: {sorted(known_top | known_tables)}")
    cfg = CompileConfig(**top)
    if cfg.model:
        cfg.model = rel(cfg.model)
    cfg.authorized = {k: rel(v) for k, v in raw.get("authorized", {}).items()}
    cfg.unauthorized = {k: rel(v) for k, v in raw.get("unauthorized", {}).items()}
    if "preprocess" in raw:
        cfg.preprocess = preprocess_from(raw["preprocess"])
    cfg.mask = _table(MaskConfig, raw.get("mask", {}), f"{p} [mask]")
    cfg.gates = _table(Gates, {"max_source_drop": 1.0, **raw.get("gates", {})}, f"{p} [gates]")
    cfg.synthesis = _table(SynthesisConfig, raw.get("synthesis", {}), f"{p} [synthesis]")
    validate(cfg, str(p))
    return cfg


def validate(cfg: CompileConfig, where: str = "config") -> None:
    if cfg.mode is not None and cfg.mode not in MODES:
        raise UserError(f"{where}: mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.device not in DEVICES:
        raise UserError(f"{where}: device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    overlap = set(cfg.authorized) & set(cfg.unauthorized)
    if overlap:
        raise UserError(f"{where}: domain names used as both authorized and unauthorized: {sorted(overlap)}")
    if len(cfg.authorized) > 1:
        raise UserError(f"{where}: one authorized domain is supported, got {sorted(cfg.authorized)}")
