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
    workers = 2                            # DataLoader processes (default: 2 for ImageFolder domains, else 0)

    [preprocess]                           # size, channels, mean, std
    [authorized]    NAME = "path.npz"
    [unauthorized]  NAME = "path.npz"
    [mask]                                 # see mapc.masking.MaskConfig
    [gates]                                # max_source_drop, max_target_acc, min_target_drop
    [synthesis]                            # source-free/data-free: see mapc.synthesis.SynthesisConfig
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UserError
from .typed import typed_fields, typed_value
from .gates import Gates, validate_gates
from .preprocess import Preprocess, preprocess_from

# Default saliency lock per mode (the fraction of each layer's weights kept whatever the mask learns).
# With real authorized rows nothing is locked. With synthesized ones the lock bounds what the mask can take
# from the real authorized domain, which it never sees. Measured on the plain sample model with the
# generator synthesis, before hard-row mining (seed 0, samples/README.md "Synthesis: what was tried"):
# source-free 0.3 keeps 69.6 %
# of real mnist, 0.45 93.3 %, 0.6 92.3 % with uci 23.7 %; data-free 0.3 keeps 95.6 % (uci 29.6 %), 0.35
# 95.9 % (uci 24.7 %), 0.4 96.7 % (uci 48.4 %), 0.5 97.4 % (uci 63.2 %). Source-free went from 0.45 to 0.35
# with feature keeping (FEATURE_WEIGHT): with it, 0.45 let uci up to 27.5 % at seed 4, 0.35 15.2 % at the same drop.
KEEP_SALIENT = {"source-available": 0.0, "source-free": 0.35, "data-free": 0.35}
# Default hard-row mining of authorized batches per mode (candidates per kept row; 1 = off). Measured in
# mapc.masking's docstring: it helps source-free and costs data-free its protection.
HARD_KEEP = {"source-available": 1, "source-free": 8, "data-free": 1}
# Default translation jitter of authorized rows per mode (pixels; mapc.loader). Synthesized images sit at the
# centre of what the model accepts; shifting them as its training augmentation did keeps the mask's function
# on more of the real authorized domain. Measured in mapc.masking's docstring.
JITTER = {"source-available": 0, "source-free": 2, "data-free": 2}
# Default weight of the in-batch probe term per mode (mapc.masking). Against real unauthorized rows it takes
# the label out of the logits. Against synthesized neighbor domains (data-free) it buys nothing on the real
# domains the mask is meant for and costs the authorized domain: on the plain sample (one thread, seeds 0/1)
# real uci's held-out probe read 86.7/88.2 % with it and 89.5/88.9 % without, while the chosen masks dropped
# mnist 2.60/2.60 points with it and 2.00/2.50 without (samples/README.md, "Later still"). With it off the
# checkpoint choice reads top-1 alone (mapc.masking.CheckpointSelector).
PROBE_WEIGHT = {"source-available": 2.0, "source-free": 2.0, "data-free": 0.0}
# Default weight of feature keeping per mode (mapc.masking.feature_loss: the masked model's BatchNorm inputs on
# the authorized rows held to the frozen model's). Source-free keeps the frozen model's logits on synthesized
# rows and, without it, lost real mnist rows near a class border (drop 1.40-2.35 points over seeds 0-6). Measured on
# the plain sample (scratch, shipped checkpoints, samples/README.md "Feature keeping"): weight 1, seeds 0/5:
# drop 1.50/1.30, uci 15.5/18.3 % (without: 1.95/1.65, 15.8/16.3 %); weight 3, seeds 0/5/4: 0.90/1.25/0.80, uci
# 19.5/18.2/27.5 %; weight 3 with the lock at 0.35 (the defaults), seeds 0/4: 1.35/0.80, uci 14.8/15.2 %.
# Compiled with these defaults, seeds 0-6: drop 1.35/1.70/1.50/1.35/0.80/1.10/1.25, uci 14.8/14.7/13.5/15.5/15.2/
# 15.1/15.5 % (before: 1.95/1.80/1.65/1.45/1.40/1.65/2.35, uci 15.8/13.0/13.7/18.0/20.2/16.3/16.0 %). Real
# authorized rows carry the function themselves. Data-free with weight 3 (scratch, seeds 0/1/3/6) dropped
# 1.05-1.35 points but let uci spread to 20.1-50.3 %, so it stays off there.
FEATURE_WEIGHT = {"source-available": 0.0, "source-free": 3.0, "data-free": 0.0}
# Default mask steps and checkpoint tie-break per mode. Source-free learns with part of every layer locked and on
# its hardest rows, and keeps breaking uci after 1,000 steps. Among checkpoints statistically tied on the worst
# unauthorized figure (mapc.masking.CheckpointSelector), real authorized rows choose the lowest worst top-1 (what a
# release gate measures); synthesized ones choose the lowest validation drop, because a drop measured on synthesized
# images understates what real authorized rows lose (source-free seed 0 before feature keeping: at most 0.73 points
# per checkpoint where real mnist lost 1.55-2.90). Measured on the plain sample in source-free mode (default
# threads, seeds 0/1/2; samples/README.md, "Later still"): 1,000 steps, top-1 tie-break: drop 1.80/1.70/1.45, uci
# 20.6/12.7/14.4 %; 1,500 steps, top-1: 2.05/1.65/2.20, uci 12.8/14.3/12.8 %; 1,500 steps, drop: 1.40/1.80/1.35, uci
# 16.3/19.0/14.7 % (scratch replays). With these settings before feature keeping, seeds 0-2: 1.50/1.55/1.35, uci
# 17.0/12.9/15.0 % on the machine they were chosen on (out of sample the drop reached 2.05 at seed 5),
# 1.95/1.80/1.65, uci 15.8/13.0/13.7 % on the one the README's modes table was measured on. "top1-then-drop" (those
# also tied on the worst top-1, then the lowest drop) is for runs whose probe figure ties nearly every checkpoint:
# with two generators (`[synthesis] generators`) the lowest drop shipped early checkpoints whose uci top-1 had not
# come down (scratch replays, seeds 0/1/2/5: uci 14.1/13.3/15.5/19.8 % with "drop", 13.8/13.1/15.5/16.5 % with it,
# drop 1.65/1.85/1.25/1.05 and 1.60/1.85/1.25/1.05); with one generator it changed nothing that matters (seeds 0/5:
# 2.00/1.65 against 1.95/1.65; samples/README.md, "Two generators").
STEPS = {"source-available": 1000, "source-free": 1500, "data-free": 1000}
# Default source budget per mode: the points of validation source drop a chosen checkpoint may cost. In data-free
# mode the validation rows are synthesized, and the neighbors are drawn down to a tenth of a shift's strength
# (mapc.synthesis), right next to them: their top-1 swings by points from one checkpoint to the next while real
# mnist barely moves. Plain sample, seeds 0/1/2/6, per checkpoint (scratch, real rows measured, never read by the
# choice): synthesized drop 1.27-7.27 / 0.27-5.33 / 1.80-17.47 / 1.40-7.47 points, real 2.05-2.95 / 1.80-2.60 /
# 1.50-4.40 / 1.50-2.25; with a budget of 1 three of the four runs had no feasible checkpoint and shipped the
# lowest synthesized drop (seed 2: step 150, uci 40.3 %, before uci fell). Every checkpoint within 5 points read
# real mnist within 2.95 points (samples/README.md, "Neighbors at every strength").
SOURCE_BUDGET = {"source-available": 1.0, "source-free": 1.0, "data-free": 5.0}
TIE_BREAK = {"source-available": "top1", "source-free": "drop", "data-free": "drop"}
TIE_BREAKS = ("top1", "drop", "top1-then-drop")


@dataclass
class MaskConfig:
    granularity: str = "weight"          # "weight" or "channel"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    mask_classifier: bool = False        # the final classifier is left unmasked by default
    steps: int | None = None             # None: the mode's STEPS (1,000; 1,500 in source-free mode)
    batch_size: int = 32
    lr: float = 0.03
    score_init: float = 2.0
    temperature: float = 1.0
    target_weight: float = 2.0
    margin_weight: float = 1.0
    margin: float = 1.0
    margin_fn: str = "softplus"          # "softplus" keeps pushing; "hinge" stops `margin` below; "top" stops once off top
    adaptive_domains: bool = True        # weight each unauthorized domain by its current batch accuracy
    uniform_weight: float = 1.0          # CE-to-uniform on unauthorized batches
    independence_weight: float = 0.0     # between-class scatter of log-probabilities / total scatter
    collapse_weight: float = 0.0         # within-domain scatter of log-probabilities (one output for every row)
    probe_weight: float | None = None    # in-batch ridge probe: R^2 of one-hot labels from standardised logits;
                                         # None: the mode's PROBE_WEIGHT (2 with real unauthorized rows)
    probe_alpha: float = 1.0             # the in-batch probe's ridge
    feature_weight: float | None = None  # keep the frozen model's BatchNorm inputs on authorized batches;
                                         # None: the mode's FEATURE_WEIGHT
    ramp_steps: int = 100
    kl_weight: float = 1.0
    source_weight: float = 1.0
    cosine_lr: bool = True
    optimizer: str = "sgd"               # "adam", or "sgd": momentum SGD on per-tensor RMS-normalised gradients
    eval_every: int = 50
    val_rows: int = 500                  # held out of each domain's train rows for mask selection
    source_budget: float | None = None   # points of validation source drop a selected mask may cost; None:
                                         # the mode's SOURCE_BUDGET
    tie_break: str | None = None         # among tied checkpoints: "top1" or "drop" first, or "top1-then-drop"
                                         # (those also tied on top-1, then the lowest drop); None: TIE_BREAK
    hard_keep: int | None = None         # authorized candidates per kept row (hardest by KL); None: HARD_KEEP
    keep_salient: float | None = None    # fraction locked by saliency; None: 0 with real authorized rows,
                                         # the mode's KEEP_SALIENT (see resolved_for)
    jitter: int | None = None            # authorized rows shifted by up to this many pixels per step; None: JITTER

    def __post_init__(self):
        if self.granularity not in ("weight", "channel"):
            raise UserError(f"mask.granularity must be 'weight' or 'channel', got {self.granularity!r}")
        steps_ok = self.steps is None or self.steps >= 1
        if not steps_ok or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise UserError("mask.steps, mask.batch_size, mask.lr and mask.temperature must be positive")
        if self.keep_salient is not None and not 0.0 <= self.keep_salient < 1.0:
            raise UserError(f"mask.keep_salient must be in [0, 1), got {self.keep_salient}")
        if self.tie_break is not None and self.tie_break not in TIE_BREAKS:
            raise UserError(f"mask.tie_break must be one of {', '.join(TIE_BREAKS)}, got {self.tie_break!r}")
        if self.source_budget is not None and not self.source_budget >= 0:
            raise UserError(f"mask.source_budget must be 0 or more points, got {self.source_budget}")
        if self.probe_weight is not None and not self.probe_weight >= 0:
            raise UserError(f"mask.probe_weight must be 0 or more, got {self.probe_weight}")
        if self.feature_weight is not None and not self.feature_weight >= 0:
            raise UserError(f"mask.feature_weight must be 0 or more, got {self.feature_weight}")
        if not self.collapse_weight >= 0:
            raise UserError(f"mask.collapse_weight must be 0 or more, got {self.collapse_weight}")
        if self.jitter is not None and self.jitter < 0:
            raise UserError(f"mask.jitter must be 0 or a positive number of pixels, got {self.jitter}")

    def resolved_for(self, mode: str) -> "MaskConfig":
        """A copy with ``keep_salient``, ``hard_keep``, ``jitter``, ``probe_weight``, ``feature_weight``, ``steps``,
        ``source_budget`` and ``tie_break`` decided: explicit values win, otherwise the mode's defaults."""
        return replace(self, keep_salient=KEEP_SALIENT[mode] if self.keep_salient is None else self.keep_salient,
                       hard_keep=HARD_KEEP[mode] if self.hard_keep is None else self.hard_keep,
                       jitter=JITTER[mode] if self.jitter is None else self.jitter,
                       probe_weight=PROBE_WEIGHT[mode] if self.probe_weight is None else self.probe_weight,
                       feature_weight=FEATURE_WEIGHT[mode] if self.feature_weight is None else self.feature_weight,
                       steps=STEPS[mode] if self.steps is None else self.steps,
                       source_budget=SOURCE_BUDGET[mode] if self.source_budget is None else self.source_budget,
                       tie_break=TIE_BREAK[mode] if self.tie_break is None else self.tie_break)


SYNTHESIS_METHODS = ("generator", "pixels")


@dataclass
class SynthesisConfig:
    """Model inversion settings (``mapc.synthesis``). ``batch``, ``steps`` and ``lr`` depend on the method
    and default to its measured values when left unset (see ``resolved``). With several generators
    ``images`` and ``steps`` are per generator."""
    method: str = "generator"   # "generator": a conditional generator; "pixels": per-image optimisation
    images: int = 2048          # synthetic pseudo-authorized images (per generator)
    batch: int | None = None    # generator: images per training step (64); pixels: images per batch (256)
    steps: int | None = None    # generator: training steps (800); pixels: optimisation steps per batch (100)
    lr: float | None = None     # generator: Adam lr (1e-3); pixels: Adam lr on the pixels (0.1)
    width: int = 32             # generator channels
    bn_weight: float = 1.0
    first_bn_weight: float = 10.0   # the first BatchNorm sees the input statistics directly: weight it up
    chroma_weight: float = 10.0     # prior: squared deviation of each channel from the pixel's channel mean
    tv_weight: float = 0.5          # pixels only (the generator's convolutions are the smoothness prior)
    l2_weight: float = 1e-3         # pixels only
    init_std: float = 0.2           # pixels only
    jitter: int = 2                 # random translation (pixels) of the batch at every step
    generators: int = 1             # generator: independently trained generators, each drawing ``images``
                                    # (two did not give source-free margin on the sample: samples/README.md,
                                    # "Two generators")
    neighbor_min_strength: float = 0.1   # data-free: each neighbor row shifted at a strength in [this, 1]
    neighbor_compose: float = 0.5        # data-free: the probability a neighbor row gets a second shift

    def __post_init__(self):
        if self.method not in SYNTHESIS_METHODS:
            raise UserError(f"synthesis.method must be one of {', '.join(SYNTHESIS_METHODS)}, got {self.method!r}")
        if not (isinstance(self.generators, int) and self.generators >= 1):
            raise UserError(f"synthesis.generators must be a positive whole number, got {self.generators!r}")
        if self.method == "pixels" and self.generators != 1:
            raise UserError(f"synthesis.generators = {self.generators} needs method = \"generator\" (per-image "
                            f"optimisation trains no generator); remove it or set method = \"generator\"")
        for name in ("neighbor_min_strength", "neighbor_compose"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"synthesis.{name} must be in [0, 1], got {getattr(self, name)!r}")

    def resolved(self) -> "SynthesisConfig":
        """A copy with the method's defaults filled in for unset ``batch``, ``steps`` and ``lr``."""
        gen = self.method == "generator"
        return replace(self, batch=self.batch or (64 if gen else 256), steps=self.steps or (800 if gen else 100),
                       lr=self.lr or (1e-3 if gen else 0.1))


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
    watermark: str | None = None         # key file (--watermark); never read from TOML, never written anywhere
    workers: int | None = None           # DataLoader processes reading rows; None: 2 for ImageFolder domains, else 0

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

    known_top = {"model", "arch", "trust_pickle", "mode", "seed", "device", "skip_passes", "workers"}
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
    if cfg.workers is not None and not 0 <= cfg.workers <= 64:
        raise UserError(f"{where}: workers must be 0..64 (DataLoader processes), got {cfg.workers}")
    if cfg.seed < 0 or cfg.seed >= 2 ** 32:
        raise UserError(f"{where}: seed must be in 0..2**32-1, got {cfg.seed}")
    validate_gates(cfg.gates, where)
    check_skippable(cfg.skip_passes, where)
    for table, section in (("mask", cfg.mask), ("synthesis", cfg.synthesis)):
        check_ranges(section, table, where)


# numeric settings that must be > 0; every other number must be >= 0 except those that may be negative
POSITIVE = {"mask": {"steps", "batch_size", "lr", "temperature", "eval_every", "hard_keep"},
            "synthesis": {"images", "batch", "steps", "lr", "width", "generators"}}
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
