"""Compile configuration: dataclasses loaded from TOML, then overridden by CLI flags.

Precedence: built-in defaults < TOML file < command-line flags. Relative paths
in a TOML file are relative to that file's folder, so a config can travel
with its data. Unknown keys are errors (a typo must not silently fall back to
a default), and every value is checked against its field's declared type
before any dataclass is built: ``trust_pickle = "false"`` is a string, not a
boolean, and is refused, as is ``seed = "abc"`` or a NaN where a number is
expected; an integer is accepted where a float is declared, and a single value
where a tuple of them is (``mean = 0.5``). Nothing is read from environment
variables.

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
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .typed import typed_fields, typed_value
from .gates import Gates, validate_gates
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
    try:
        return cls(**typed_fields(cls, d, where))
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(where) else f"{where}: {msg}")


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

    known_top = {"model", "arch", "trust_pickle", "mode", "seed", "device", "skip_passes"}
    known_tables = {"preprocess", "authorized", "unauthorized", "mask", "gates", "synthesis"}
    unknown = set(raw) - known_top - known_tables
    if unknown:
        raise UserError(f"{p}: unknown keys {sorted(unknown)}; known: {sorted(known_top | known_tables)}")
    for k in known_tables & set(raw):
        if not isinstance(raw[k], dict):
            raise UserError(f"{p}: {k} must be a table ([{k}] with keys below it), got {raw[k]!r}")
    top = {k: raw[k] for k in known_top & set(raw)}
    cfg = CompileConfig(**typed_fields(CompileConfig, top, str(p)))
    if cfg.model:
        cfg.model = rel(cfg.model)
    for role in ("authorized", "unauthorized"):
        table = typed_value(raw.get(role, {}), dict[str, str], str(p), f"[{role}]")
        setattr(cfg, role, {k: rel(v) for k, v in table.items()})
    if "preprocess" in raw:
        cfg.preprocess = preprocess_from(raw["preprocess"], f"{p} [preprocess]")
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
    if cfg.seed < 0 or cfg.seed >= 2 ** 32:
        raise UserError(f"{where}: seed must be in 0..2**32-1, got {cfg.seed}")
    validate_gates(cfg.gates, where)
    check_skippable(cfg.skip_passes, where)
    for table, section in (("mask", cfg.mask), ("synthesis", cfg.synthesis)):
        check_ranges(section, table, where)


# numeric settings that must be > 0; every other number must be >= 0 except those that may be negative
POSITIVE = {"mask": {"steps", "batch_size", "lr", "temperature", "eval_every"},
            "synthesis": {"images", "batch", "steps", "lr"}}
SIGNED = {"mask": {"score_init"}, "synthesis": set()}


def check_ranges(section, table: str, where: str) -> None:
    """Counts, rates and weights of ``[table]`` in range (one line naming the key on failure)."""
    import math
    from dataclasses import fields
    for f in fields(section):
        v = getattr(section, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise UserError(f"{where}: {table}.{f.name} must be a finite number, got {v!r}")
        if f.name in POSITIVE[table] and v <= 0:
            raise UserError(f"{where}: {table}.{f.name} must be positive, got {v!r}")
        if f.name not in SIGNED[table] and v < 0:
            raise UserError(f"{where}: {table}.{f.name} must not be negative, got {v!r}")


def check_skippable(skip: list[str], where: str = "command line") -> None:
    """``--skip-pass`` names: known passes only, and never one that the protection's integrity rests on."""
    import passes
    for name in skip:
        if name not in passes.REGISTRY:
            raise UserError(f"{where}: --skip-pass {name!r} is not a pass; `mapc passes` lists them")
        if name in passes.MANDATORY:
            raise UserError(f"{where}: --skip-pass {name}: this pass cannot be skipped ({passes.MANDATORY[name]})")
