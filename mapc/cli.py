"""The ``mapc`` command line.

stdout carries results (a table and one final verdict line, or JSON with
``--json``); logs and progress go to stderr. Exit codes: 0 ok, 1 a gate
failed, 2 bad input (one line on stderr, no traceback).
"""
from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import UserError


def fail(message: str) -> None:
    click.echo(f"mapc: error: {message}", err=True)
    sys.exit(2)


class MapcGroup(click.Group):
    """Turns UserError, click's own usage errors (and the PassError of a broken model) into one line and an
    exit code: 2 for bad input."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            fail("interrupted; nothing was written")
        except click.ClickException as e:   # unknown option, bad choice, a path click already checked
            fail(f"{e.format_message()} (see `mapc --help`)")
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        from passes import PassError
        try:
            return super().invoke(ctx)
        except UserError as e:
            fail(str(e))
        except PassError as e:
            click.echo(f"mapc: pass failed: {e}", err=True)
            sys.exit(1 if e.pass_name == "audit" else 2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            fail("interrupted; nothing was written")
        except MemoryError:
            fail("ran out of memory (data or model too large for this machine); nothing was written")
        except Exception as e:   # never exit 1 (a failed gate) on a failure nobody anticipated
            fail(f"unexpected failure ({type(e).__name__}: {' '.join(str(e).split())[:200]}); nothing was written; "
                 f"please report it")


def sealed_preprocess_options(command):
    """--input-size, --channels, --mean, --std: override the preprocessing sealed into an artifact."""
    for option in reversed((
            click.option("--input-size", type=int, nargs=2, metavar="H W", help="Override the sealed input size."),
            click.option("--channels", type=click.Choice(["1", "3"]), help="Override the sealed channel count."),
            click.option("--mean", type=str, metavar="M[,M,M]", help="Override the sealed mean."),
            click.option("--std", type=str, metavar="S[,S,S]", help="Override the sealed std."))):
        command = option(command)
    return command


@click.group(cls=MapcGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mapc")
def main():
    """mapc: compile a trained classifier into an ONNX artifact that works on its
    authorized domain and is useless on unauthorized ones (MAP, mask pruning).

    \b
    Typical use:
      mapc compile model.pt2 --authorized mnist=mnist.npz \\
          --unauthorized svhn=svhn.npz -o build/
      mapc passes                      # the compiler passes, in order
    """


@main.command("compile")
@click.argument("model", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config; flags override it.")
@click.option("--authorized", multiple=True, metavar="NAME=PATH",
              help="Authorized domain: .npz (images, labels, split) or ImageFolder directory.")
@click.option("--unauthorized", multiple=True, metavar="NAME=PATH",
              help="Unauthorized domain to break; repeat for several.")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Output folder (written atomically: complete or untouched).")
@click.option("--mode", type=click.Choice(["source-available", "source-free", "data-free"]),
              help="Default: inferred from the data given.")
@click.option("--arch", metavar="PKG.MODULE:FACTORY", help="Architecture factory for a state_dict model.")
@click.option("--trust-pickle", is_flag=True, default=None,
              help="Allow loading a fully pickled nn.Module (runs code from the file).")
@click.option("--seed", type=int, help="Random seed (mask learning is deterministic for a seed on CPU).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to learn the mask.")
@click.option("--granularity", type=click.Choice(["weight", "channel"]), help="Mask per weight or per output channel.")
@click.option("--steps", type=int, help="Mask-learning steps (default 1,000; 1,500 in source-free mode).")
@click.option("--keep-salient", type=float, metavar="F",
              help="Lock the fraction F of each layer's weights most salient for the authorized (or synthesized) "
                   "rows: never pruned. Default 0 with real authorized rows; 0.35 source-free and data-free.")
@click.option("--input-size", type=int, nargs=2, metavar="H W", help="Model input size.")
@click.option("--channels", type=click.Choice(["1", "3"]), help="Model input channels.")
@click.option("--mean", type=str, metavar="M[,M,M]", help="Per-channel mean after scaling pixels to [0,1].")
@click.option("--std", type=str, metavar="S[,S,S]", help="Per-channel std after scaling pixels to [0,1].")
@click.option("--max-source-drop", type=float, help="Gate: authorized accuracy may drop at most this many points.")
@click.option("--max-target-acc", type=float, help="Gate: every unauthorized domain at most this accuracy (%).")
@click.option("--max-probe-acc", type=float,
              help="Gate: a linear probe on the artifact's logits, fitted on 10 % of each unauthorized domain's "
                   "labelled train rows, recovers at most this accuracy (%).")
@click.option("--no-gates", is_flag=True,
              help="Build without gates (a requested gate that has no data to measure fails otherwise).")
@click.option("--watermark", metavar="KEYFILE", type=click.Path(dir_okay=False),
              help="Also learn an ownership watermark from this secret key (32 bytes; created when the file does "
                   "not exist, never written into the artifact or report). Prove ownership later with "
                   "`mapc verify SUSPECT --ownership KEYFILE`.")
@click.option("--skip-pass", "skip_passes", multiple=True, metavar="NAME", help="Do not run this optional pass (see `mapc passes`); fold_masks, seal, audit and check always run.")
@click.option("--workers", type=click.IntRange(0, 64),
              help="DataLoader processes reading and preprocessing rows while the mask learns (default 2 when a "
                   "domain is an ImageFolder, else 0).")
@click.option("--nproc", type=click.IntRange(1, 64),
              help="Learn the mask data-parallel in N processes (torch.distributed: gloo on CPU, nccl on CUDA, one "
                   "GPU each); every process holds the same mask, process 0 builds and writes OUTDIR. mask.batch_size "
                   "must be divisible by N. Same as `torchrun --nproc_per_node N -m mapc compile ...`.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no log lines on stderr.")
def compile_cmd(model, config_path, authorized, unauthorized, outdir, mode, arch, trust_pickle, seed, device,
                granularity, steps, keep_salient, input_size, channels, mean, std, max_source_drop, max_target_acc,
                max_probe_acc, no_gates, watermark, skip_passes, workers, nproc, as_json, quiet):
    """Learn a protection mask for MODEL and compile it into OUTDIR/protected.onnx.

    MODEL is a torch.export program (.pt2), a TorchScript archive, a state_dict
    (with --arch) or, with --trust-pickle only, a pickled nn.Module. Data given as
    NAME=PATH: train rows teach the mask, test rows measure it with onnxruntime.
    OUTDIR gets protected.onnx, report.json, report.md and report.html; the
    unprotected model is never written there.

    \b
    Modes (inferred from the data when --mode is omitted):
      source-available  learn from --authorized and --unauthorized train rows
      source-free       learn from --unauthorized rows and images synthesized
                        from the model (needs BatchNorm); --authorized is only measured
      data-free         learn from synthesized images and neighbor domains only
    Exit codes: 0 every gate held, 1 a gate failed (or had nothing to measure:
    without --authorized data the default max-source-drop gate fails; measure
    with held-out authorized rows, gate later with `mapc verify`, or pass
    --no-gates), 2 bad input.

    \b
    Example (the bundled sample):
      mapc compile --config samples/digits.toml -o build/digits
    """
    from dataclasses import replace

    from .compile import compile_model
    from .config import CompileConfig, load_config, validate
    from .datasets import parse_specs
    from .report import table, verdict

    cfg = load_config(config_path) if config_path else CompileConfig()
    if model:
        cfg.model = model
    if authorized:
        cfg.authorized = parse_specs(authorized, "--authorized")
    if unauthorized:
        cfg.unauthorized = parse_specs(unauthorized, "--unauthorized")
    for k, v in {"mode": mode, "arch": arch, "trust_pickle": trust_pickle, "seed": seed, "device": device}.items():
        if v is not None:
            setattr(cfg, k, v)
    if skip_passes:
        cfg.skip_passes = list(skip_passes)
    if watermark:
        cfg.watermark = watermark
    if granularity:
        cfg.mask = replace(cfg.mask, granularity=granularity)
    if steps is not None:
        cfg.mask = replace(cfg.mask, steps=steps)
    if keep_salient is not None:
        cfg.mask = replace(cfg.mask, keep_salient=keep_salient)
    cfg.preprocess = _override_preprocess(cfg.preprocess, input_size, channels, mean, std)
    if max_source_drop is not None:
        cfg.gates.max_source_drop = max_source_drop
    if max_target_acc is not None:
        cfg.gates.max_target_acc = max_target_acc
    if max_probe_acc is not None:
        cfg.gates.max_probe_acc = max_probe_acc
    if no_gates:
        from .gates import Gates
        cfg.gates = Gates()
    if workers is not None:
        cfg.workers = workers
    validate(cfg, "command line")
    from .distributed import launched
    if nproc and nproc > 1 and not launched():
        from .launch import check_nproc, run
        check_nproc(nproc, cfg)
        sys.exit(run(nproc, sys.argv[1:]))
    report = compile_model(cfg, outdir, progress=not quiet)
    if report is None:             # a helper process of a data-parallel run: process 0 reports
        from .distributed import leave_helper
        leave_helper()
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        click.echo(table(report))
        click.echo(f"artifact: {report['artifact']}")
    click.echo(verdict(report))
    sys.exit(0 if report["passed"] else 1)


@main.command("verify")
@click.argument("artifact")
@click.option("--authorized", multiple=True, metavar="NAME=PATH", help="Authorized domain (labelled).")
@click.option("--unauthorized", multiple=True, metavar="NAME=PATH", help="Unauthorized domain (labelled); repeatable.")
@click.option("--baseline", metavar="ORIGINAL", help="The unprotected model: .onnx or any format `mapc compile` takes.")
@click.option("--arch", metavar="PKG.MODULE:FACTORY", help="Architecture for a state_dict baseline.")
@click.option("--trust-pickle", is_flag=True, help="Allow a fully pickled baseline (runs code from the file).")
@click.option("--max-source-drop", type=float, metavar="PTS", help="Gate: authorized accuracy drop vs baseline, at most PTS.")
@click.option("--max-target-acc", type=float, metavar="PCT", help="Gate: every unauthorized accuracy at most PCT %.")
@click.option("--min-target-drop", type=float, metavar="PTS", help="Gate: every unauthorized drop vs baseline at least PTS.")
@click.option("--max-probe-acc", type=float, metavar="PCT",
              help="Gate: a linear probe on the artifact's logits, fitted on 10 % of each unauthorized domain's "
                   "labelled train rows, recovers at most PCT % (the data needs a train/test split).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write report.json here, with report.md and report.html beside it.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime execution provider; the report names the one that actually ran.")
@sealed_preprocess_options
@click.option("--ownership", "ownership_key", metavar="KEYFILE",
              help="Instead of gating: test whether ARTIFACT (a suspect model: .onnx or any format `mapc compile` "
                   "takes) carries the watermark of this key (`mapc compile --watermark`), on --authorized rows.")
@click.option("--reference", metavar="ARTIFACT.onnx",
              help="With --ownership: also compare the suspect's weights with the owner's artifact (weight "
                   "provenance; survives fine-tuning and input transforms, which remove the watermark).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (then the verdict line).")
def verify_cmd(artifact, authorized, unauthorized, baseline, arch, trust_pickle, max_source_drop, max_target_acc,
               min_target_drop, max_probe_acc, report_path, provider, input_size, channels, mean, std, ownership_key,
               reference, as_json):
    """Measure ARTIFACT with onnxruntime on labelled data and check release gates.

    Preprocessing is read from the artifact's sealed metadata (flags override).
    Exit 0 when every gate holds, 1 when any fails (the verdict names which),
    2 on bad input. The last stdout line is the verdict.

    \b
    Ownership (`--ownership KEYFILE`): ARTIFACT is a suspect model. Its
    accuracy on labelled authorized rows stamped with the key's trigger is
    compared, row by row, with the same rows stamped with control patterns
    (an exact one-sided McNemar test); OWNED needs p < 1e-6 and the trigger
    taking at least half of the control accuracy away. With `--reference
    ARTIFACT.onnx` the suspect's weights are also compared with the owner's
    artifact (correlation of matching weight tensors, Fisher z; DERIVED needs
    p < 1e-6 and a median correlation of at least 0.5); OWNED when either test
    holds. Verdict `OWNED | p=...` (exit 0) or `NOT OWNED | p=...` (exit 1).

    \b
    Example (gate a release in CI):
      mapc verify build/digits/protected.onnx --baseline samples/models/digits_cnn.pt2 \\
          --authorized mnist=samples/digits/mnist.npz --unauthorized syn=samples/digits/syn.npz \\
          --max-source-drop 1.0 --max-target-acc 20 --report build/verify/report.json
    """
    from .datasets import parse_specs
    from .gates import validate_gates
    from .verify import VerifyGates, VerifyRequest, verify

    if reference and not ownership_key:
        raise UserError("--reference is the owner's artifact for the ownership test: use it with --ownership KEYFILE")
    if ownership_key:
        from .ownership import OwnershipRequest, ownership_report
        if unauthorized or baseline or any(v is not None for v in (max_source_drop, max_target_acc, min_target_drop,
                                                                    max_probe_acc)):
            raise UserError("--ownership tests a suspect on --authorized rows only; leave out --unauthorized, "
                            "--baseline and the gates (run a separate mapc verify for those)")
        req = OwnershipRequest(suspect=artifact, key_path=ownership_key,
                               authorized=parse_specs(authorized, "--authorized"), provider=provider,
                               preprocess=(input_size, channels, mean, std), arch=arch, trust_pickle=trust_pickle,
                               reference=reference)
        if report_path:
            if not str(report_path).endswith(".json"):
                raise UserError(f"--report {report_path}: give a .json path")
            check_writable_file(report_path, "--report")
        report, line = ownership_report(req, _override_preprocess)
        if report_path:
            from .atomic import write_bytes_atomic
            try:
                write_bytes_atomic(report_path, (json.dumps(dict(report, verdict=line), indent=2) + "\n").encode())
            except OSError as e:
                raise UserError(f"{report_path}: cannot write the report ({e.strerror or e}); pick a writable --report")
        if as_json:
            click.echo(json.dumps(report, default=str))
        else:
            o = report["ownership"]
            click.echo(f"authorized rows: {o['n']} ({report['authorized']['name']}, test rows)\n"
                       f"clean accuracy: {o['clean_acc']:.1f} %\n"
                       f"with the key's trigger: {o['key_acc']:.1f} %\n"
                       f"with control patterns: {o['control_acc']:.1f} %\n"
                       f"rows right under control and wrong under the key: {o['b']}; the reverse: {o['c']}")
            w = report.get("provenance")
            if w is not None:
                from .watermark import p_text
                click.echo(f"weights vs the reference artifact: {w['matched']} of {w['tensors']} tensors matched, median "
                           f"correlation {w['effect']:.3f}, p={p_text(w['log10_p'])}: "
                           f"{'DERIVED' if w['derived'] else 'not derived'}")
        click.echo(line)
        sys.exit(0 if report["owned"] else 1)
    gates = VerifyGates(max_source_drop, max_target_acc, min_target_drop, max_probe_acc)
    validate_gates(gates)
    if report_path:
        check_report_paths(report_path)
    pre = artifact_preprocess_override(artifact, input_size, channels, mean, std)
    req = VerifyRequest(artifact=artifact, authorized=parse_specs(authorized, "--authorized"),
                        unauthorized=parse_specs(unauthorized, "--unauthorized"), baseline=baseline,
                        gates=gates, provider=provider,
                        preprocess=pre, arch=arch, trust_pickle=trust_pickle)
    overlap = set(req.authorized) & set(req.unauthorized)
    if overlap:
        raise UserError(f"domain names used as both authorized and unauthorized: {sorted(overlap)}")
    report = verify(req)
    print_and_exit(report, report_path, as_json)


@main.command("attack")
@click.argument("artifact")
@click.option("--authorized", multiple=True, metavar="NAME=PATH",
              help="Authorized domain (labelled, with a split): the source-finetune attack trains on its train rows.")
@click.option("--unauthorized", multiple=True, metavar="NAME=PATH",
              help="Unauthorized domain to attack (labelled, with a train/test split); repeatable.")
@click.option("--baseline", metavar="ORIGINAL",
              help="The unprotected model (.onnx or any format `mapc compile` takes): every attack also runs on it.")
@click.option("--arch", metavar="PKG.MODULE:FACTORY", help="Architecture for a state_dict baseline.")
@click.option("--trust-pickle", is_flag=True, help="Allow a fully pickled baseline (runs code from the file).")
@click.option("--attack", "attacks", multiple=True, metavar="NAME",
              help="Run only this attack (repeatable; names below). Default: all of them.")
@click.option("--budget", "budgets", multiple=True, type=float, metavar="FRACTION",
              help="Attacker's data: this fraction of each domain's train rows (repeatable). Default: 0.01 and 0.1.")
@click.option("--steps", type=click.IntRange(1, 100000),
              help="Optimiser steps of every trained attack (the fixed step budget; default 200).")
@click.option("--seed", type=click.IntRange(0, 2 ** 32 - 1), help="Seed for the attacker's rows and training (default 0).")
@click.option("--ownership", "ownership_key", metavar="KEYFILE",
              help="Also test every attacked copy of the artifact for the watermark of this key (`mapc compile "
                   "--watermark`) on the --authorized rows: is a stolen, adapted copy still provably yours?")
@click.option("--max-attacked-acc", type=float, metavar="PCT",
              help="Gate: on every unauthorized domain, no attack but target-finetune reaches more than PCT %.")
@click.option("--max-finetune-gain", type=float, metavar="PTS",
              help="Gate: fine-tuning the artifact on unauthorized rows beats training the same graph from scratch "
                   "on those rows by at most PTS points.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write report.json here, with report.md and report.html (tables, accuracy-vs-budget plot) beside it.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime execution provider for every measurement.")
@sealed_preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (then the verdict line).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def attack_cmd(artifact, authorized, unauthorized, baseline, arch, trust_pickle, attacks, budgets, steps, seed,
               ownership_key, max_attacked_acc, max_finetune_gain, report_path, provider, input_size, channels, mean,
               std, as_json, quiet):
    """Attack ARTIFACT as someone who holds it would, and report what they recover.

    The ONNX graph is imported back into torch (checked against onnxruntime
    first); nothing else of the compile is used. Each attack gets a fraction of
    a domain's train rows and a fixed number of steps; accuracy is measured on
    the test rows by onnxruntime, before and after.

    \b
    Attacks:
      remap            best relabelling of the outputs, or a linear probe on the logits
      target-finetune  all weights trained on labelled unauthorized rows, beside the
                       same graph trained from scratch on the same rows and steps
      source-finetune  all weights trained on labelled authorized rows only
      input-disguise   weights frozen; a small input transform learned on labelled rows
      self-training    unlabelled rows: entropy minimisation with diversity (SHOT-style)
    Exit codes: 0 every gate held (or none was asked), 1 a gate failed, 2 bad input.

    \b
    Example (the bundled sample, about 80 s on 2 otherwise idle CPU cores):
      mapc attack build/digits/protected.onnx --baseline samples/models/digits_cnn.pt2 \\
          --authorized mnist=samples/digits/mnist.npz --unauthorized uci=samples/digits/uci.npz \\
          --unauthorized mnistm=samples/digits/mnistm.npz --unauthorized syn=samples/digits/syn.npz \\
          --report build/attack/report.json
    """
    from .attack import ATTACKS, DEFAULT_BUDGETS, AttackGates, AttackRequest, AttackSettings, attack
    from .datasets import parse_specs
    from .gates import validate_gates

    gates = AttackGates(max_attacked_acc, max_finetune_gain)
    validate_gates(gates, names=("max_attacked_acc", "max_finetune_gain"))
    if report_path:
        check_report_paths(report_path)
    pre = artifact_preprocess_override(artifact, input_size, channels, mean, std)
    chosen = tuple(dict.fromkeys(attacks)) if attacks else ATTACKS
    if not attacks and not authorized:
        chosen = tuple(a for a in ATTACKS if a != "source-finetune")
        if not quiet:
            click.echo("[mapc] no --authorized data: the source-finetune attack is skipped", err=True)
    req = AttackRequest(artifact=artifact, authorized=parse_specs(authorized, "--authorized"),
                        unauthorized=parse_specs(unauthorized, "--unauthorized"), baseline=baseline,
                        attacks=chosen, budgets=tuple(budgets) if budgets else DEFAULT_BUDGETS, gates=gates,
                        settings=AttackSettings(**{k: v for k, v in (("steps", steps), ("seed", seed))
                                                   if v is not None}), provider=provider, preprocess=pre,
                        arch=arch, trust_pickle=trust_pickle, ownership_key=ownership_key)
    report = attack(req, progress=not quiet)
    print_and_exit(report, report_path, as_json)


@main.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def passes_cmd(as_json):
    """List the compiler passes of the default pipeline, in the order they run."""
    import passes

    rows = passes.describe()
    if as_json:
        click.echo(json.dumps([{"name": n, "description": d} for n, d in rows]))
        return
    w = max(len(n) for n, _ in rows)
    for i, (n, d) in enumerate(rows, 1):
        click.echo(f"{i}. {n.ljust(w)}  {d}")


def print_and_exit(report: dict, report_path: str | None, as_json: bool) -> None:
    """The end of verify and attack: reports written (when asked), table or JSON on stdout, the verdict line,
    exit 0 or 1."""
    from .report import table, verdict, write_reports
    examples = report.pop("_examples")
    line = verdict(report)
    if report_path:
        try:
            write_reports(report_path, report, line, examples)
        except OSError as e:
            raise UserError(f"{report_path}: cannot write the report ({e.strerror or e}); pick a writable --report")
    click.echo(json.dumps(report, default=str) if as_json else table(report))
    click.echo(line)
    sys.exit(0 if report["passed"] else 1)


def artifact_preprocess_override(artifact: str, input_size, channels, mean, std):
    """None (use the artifact's sealed preprocessing) unless a flag is given: then the sealed values with the
    flags applied over them."""
    if not (input_size or channels or mean or std):
        return None
    from .preprocess import Preprocess, preprocess_from
    from .verify import load_artifact, sealed_metadata
    meta = sealed_metadata(load_artifact(artifact)).get("mapc.preprocess", {})
    return _override_preprocess(preprocess_from(meta, f"{artifact}: sealed mapc.preprocess") if meta
                                else Preprocess(), input_size, channels, mean, std)


def check_report_paths(json_path: str) -> None:
    """report.json and the .md and .html written beside it must all be writable files, before any work."""
    from pathlib import Path
    if not str(json_path).endswith(".json"):
        raise UserError(f"--report {json_path}: give a .json path; report.md and report.html are written beside "
                        f"it under the same stem")
    for suffix in (".json", ".md", ".html"):
        check_writable_file(str(Path(json_path).with_suffix(suffix)), "--report")


def check_writable_file(path: str, flag: str) -> None:
    """Fail before any work if ``path`` cannot be written (its nearest existing folder must be writable)."""
    from pathlib import Path

    from .atomic import can_create, nearest_existing
    p = Path(path)
    if p.exists() and not p.is_file():
        raise UserError(f"{p}: {flag} exists and is not a file; pick another path")
    if not can_create(p):
        raise UserError(f"{p}: {flag}: {nearest_existing(p.parent)} is not a writable folder; pick a writable path")


def _override_preprocess(base, input_size, channels, mean, std):
    """``base`` with the preprocessing flags that were given; a channel change resets mean/std to 0.5."""
    from .preprocess import Preprocess

    if not (input_size or channels or mean or std):
        return base
    ch = int(channels) if channels else base.channels
    return Preprocess(size=tuple(input_size) if input_size else base.size, channels=ch,
                      mean=_floats(mean, "--mean") if mean else (base.mean if ch == base.channels else (0.5,)),
                      std=_floats(std, "--std") if std else (base.std if ch == base.channels else (0.5,)))


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers such as 0.5,0.5,0.5")


if __name__ == "__main__":
    main()
