"""The ``onnxopt`` command line: run, passes, golden, verify, check, inspect, bench."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

import onnxopt
from onnxopt import golden as golden_mod
from onnxopt import latency as latency_mod
from onnxopt import model_io, ort_runner
from onnxopt.cli import bench as bench_mod
from onnxopt.cli import config, render
from onnxopt.errors import OnnxoptError, UsageError
from onnxopt.metrics import compare_all


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn onnxopt errors into one line on stderr and their exit code; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OnnxoptError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as err:
            if "--debug" in sys.argv:
                raise
            click.echo(
                f"internal error: {type(err).__name__}: {err} (rerun with --debug)", err=True
            )
            sys.exit(1)

    return wrapper


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """``name=value`` pairs from repeated options."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} expects name=value, got {pair!r}")
        result[key.strip()] = value.strip()
    return result


def parse_dims(pairs: tuple[str, ...]) -> dict[str, int]:
    dims = {}
    for key, value in parse_pairs(pairs, "--dim").items():
        if not value.isdigit() or int(value) <= 0:
            raise UsageError(f"--dim {key}: expected a positive integer, got {value!r}")
        dims[key] = int(value)
    return dims


def parse_tolerances(
    pairs: tuple[str, ...], atol: float | None, rtol: float | None
) -> dict[str, dict[str, float | None]]:
    """``--tolerance exact.atol=1e-3`` (repeatable) plus the ``--atol/--rtol`` shortcuts."""
    result: dict[str, dict[str, float | None]] = {}
    for key, value in parse_pairs(pairs, "--tolerance").items():
        kind, dot, name = key.partition(".")
        if not dot or kind not in ("exact", "approximate", "interface"):
            raise UsageError(f"--tolerance expects KIND.NAME=VALUE, got {key!r}")
        try:
            number = None if value.lower() == "none" else float(value)
        except ValueError:
            raise UsageError(f"--tolerance {key}: expected a number, got {value!r}") from None
        result.setdefault(kind, {})[name] = number
    for name, number in (("atol", atol), ("rtol", rtol)):
        if number is not None:
            for kind in ("exact", "interface"):
                result.setdefault(kind, {})[name] = number
    for overrides in result.values():
        onnxopt.Tolerance().replace(**overrides)  # unknown names fail here, before any work
    return result


def load_plugins(plugins: tuple[str, ...]) -> None:
    """Import user modules (a ``.py`` path or a module name) that register passes."""
    for plugin in plugins:
        try:
            if plugin.endswith(".py") or Path(plugin).exists():
                path = Path(plugin)
                if not path.is_file():
                    raise UsageError(f"plugin file not found: {plugin}")
                module_spec = importlib.util.spec_from_file_location(path.stem, path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except OnnxoptError:
            raise
        except Exception as err:
            raise UsageError(f"cannot load plugin {plugin}: {type(err).__name__}: {err}") from None


plugin_option = click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="FILE.py|MODULE",
    help="Import a module that registers passes (repeatable).",
)


def load_inputs(path: str | None) -> list[dict] | None:
    return golden_mod.load_npz(path) if path else None


common_tolerance = [
    click.option("--atol", type=float, help="Absolute tolerance for exact passes."),
    click.option("--rtol", type=float, help="Relative tolerance for exact passes."),
    click.option(
        "--tolerance",
        "tolerance_pairs",
        multiple=True,
        metavar="KIND.NAME=VALUE",
        help="Tolerance override, e.g. approximate.min_cosine=0.999 (repeatable).",
    ),
]


def with_options(options: list[Callable]) -> Callable:
    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


class OnnxoptGroup(click.Group):
    """The command group; click's own usage errors also print as one ``error:`` line (exit 2)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:
            click.echo(err.ctx.get_help() if err.ctx else err.format_message(), err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            ctx = getattr(err, "ctx", None)
            hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
            click.echo(f"error: {err.format_message()}{hint}", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=OnnxoptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(onnxopt.__version__, prog_name="onnxopt")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def cli(debug: bool) -> None:
    """onnxopt: rewrite ONNX models, verifying every pass against golden outputs."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Pipeline file (.toml or .json); flags given here override it.",
)
@click.option(
    "--save-config",
    "save_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write these settings to a pipeline file (.toml or .json), then run.",
)
@click.option("--passes", "spec", default="simplify", show_default=True, help="Pipeline spec.")
@click.option("--target", metavar="NAME|FILE", help="Target of every pass with a target option.")
@click.option("--golden", "golden_dir", type=click.Path(path_type=Path), help="Golden set folder.")
@click.option("--no-verify", is_flag=True, help="Skip numeric checks (structure is checked).")
@click.option("--keep-going", is_flag=True, help="Roll back failing passes and continue.")
@click.option("--explain", is_flag=True, help="Say why rules that almost matched did not fire.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    help="Write the report: an HTML page for .html, JSON otherwise.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Force or forbid external data (default: when the input had it or weights > 1.5 GiB).",
)
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Symbolic dim for capture.")
@click.option("--seed", default=0, show_default=True, help="Seed for captured golden inputs.")
@click.option(
    "--latency",
    "latency_runs",
    type=int,
    metavar="N",
    help="Time the input and each changed model in ORT CPU: median of N runs after a warm-up.",
)
@click.option(
    "--threads",
    type=int,
    metavar="N",
    help="ORT intra-op threads for --latency (default 1; 0: ORT's default).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the 'wrote' line.")
@click.option("-v", "--verbose", is_flag=True, help="Also print notes, near misses, timings.")
@plugin_option
@with_options(common_tolerance)
@handle_errors
def run(
    model: Path,
    output: Path,
    config_path: Path | None,
    save_path: Path | None,
    spec: str,
    target: str | None,
    golden_dir: Path | None,
    no_verify: bool,
    keep_going: bool,
    explain: bool,
    report_path: Path | None,
    as_json: bool,
    external_data: bool | None,
    dims: tuple[str, ...],
    seed: int,
    latency_runs: int | None,
    threads: int | None,
    quiet: bool,
    verbose: bool,
    plugins: tuple[str, ...],
    atol: float | None,
    rtol: float | None,
    tolerance_pairs: tuple[str, ...],
) -> None:
    """Run a pipeline of passes on MODEL and write the result to OUTPUT."""
    start = time.perf_counter()
    if quiet and (verbose or explain):
        raise UsageError("--quiet cannot be combined with --verbose or --explain")
    latency = latency_settings(latency_runs, threads)
    file_values = config.read(config_path) if config_path else {}
    given = click.get_current_context().get_parameter_source
    flags: dict[str, Any] = {
        field: value
        for field, param, value in (
            ("passes", "spec", spec),
            ("target", "target", target),
            ("golden", "golden_dir", golden_dir),
            ("verify", "no_verify", not no_verify),
            ("keep_going", "keep_going", keep_going),
            ("report", "report_path", report_path),
            ("external_data", "external_data", external_data),
            ("seed", "seed", seed),
        )
        if given(param) not in (None, ParameterSource.DEFAULT)
    }
    for field, value in (
        ("dims", parse_dims(dims)),
        ("plugins", list(plugins)),
        ("tolerances", parse_tolerances(tolerance_pairs, atol, rtol)),
    ):
        if value:
            flags[field] = value
    settings = config.merge(file_values, flags)
    load_plugins(tuple(settings.plugins))
    try:  # a bad spec fails before the model is read
        passes = build_passes(settings.passes, settings.target)
    except UsageError as err:
        from_file = {"passes", "target"} & (file_values.keys() - flags.keys())
        raise UsageError(f"{config_path}: {err}" if from_file else str(err)) from None
    if settings.report is not None and not settings.report.absolute().parent.is_dir():
        raise UsageError(f"report folder does not exist: {settings.report.absolute().parent}")
    if settings.golden is not None and settings.dims:
        raise UsageError("--dim/dims only apply when the golden set is captured; drop them or it")
    if save_path is not None:
        protected = (model, output, *([settings.report] if settings.report else []))
        saved = config.write(settings, save_path, protected)
        click.echo(f"wrote {saved}", err=as_json)
    show_progress = verbose or not (as_json or quiet)
    progress = render.progress_printer(always=verbose) if show_progress else None
    _, report = onnxopt.optimize(
        model,
        passes,
        latency=latency,
        golden=settings.golden,
        verify=settings.verify,
        dims=settings.dims,
        seed=settings.seed,
        tolerances=settings.tolerances,
        keep_going=settings.keep_going,
        output=output,
        external_data=settings.external_data,
        progress=progress,
    )
    plugin_args = "".join(
        f" --plugin {Path(p).absolute() if p.endswith('.py') else p}" for p in settings.plugins
    )
    for entry in report.failed:
        if entry.reproducer and plugin_args:
            entry.reproducer["command"] += plugin_args
    if settings.report:
        report.write(settings.report)
    if as_json:
        click.echo(report.to_json())
    else:
        text = render.report_table(
            report,
            explain=explain or verbose,
            quiet=quiet,
            color=render.use_color(),
            seconds=time.perf_counter() - start if verbose else None,
        )
        click.echo(text)
    sys.exit(report.exit_code)


def latency_settings(runs: int | None, threads: int | None) -> latency_mod.LatencySettings | None:
    """``--latency N [--threads T]`` as settings (None when not asked for)."""
    if runs is None:
        if threads is not None:
            raise UsageError("--threads only applies with --latency N")
        return None
    if runs < 1:
        raise UsageError(f"--latency expects at least 1 run, got {runs}")
    if threads is not None and threads < 0:
        raise UsageError(f"--threads must not be negative, got {threads}")
    return latency_mod.LatencySettings(runs=runs, threads=1 if threads is None else threads)


def build_passes(spec_text: str, target: str | None) -> list[onnxopt.Pass]:
    """The pipeline's passes; ``target`` goes to every pass with a ``target`` option not set."""
    if target is None:
        return onnxopt.Pipeline(spec_text).passes
    from onnxopt import spec as spec_mod
    from onnxopt.targets import load_target

    load_target(target)
    passes = spec_mod.build(spec_text, inherited={"target": target})
    if not any(f.name == "target" for p in passes for f in p.options()):
        raise UsageError(f"--target {target}: no pass in '{spec_text}' has a target option")
    return passes


@cli.command("bench")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("model2", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--runs", default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", default=5, show_default=True, help="Untimed runs before them.")
@click.option(
    "--threads", default=0, show_default=True, help="ORT intra-op threads (0: ORT's default)."
)
@click.option(
    "--opt-level",
    type=click.Choice(latency_mod.OPT_LEVELS),
    default="all",
    show_default=True,
    help="ORT graph optimization level.",
)
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Size of a symbolic dim.")
@click.option("--seed", default=0, show_default=True, help="Seed of synthesized inputs.")
@click.option(
    "--golden",
    "golden_dir",
    type=click.Path(path_type=Path),
    help="Take inputs from a golden set (its first case).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def bench(
    model: Path,
    model2: Path | None,
    runs: int,
    warmup: int,
    threads: int,
    opt_level: str,
    dims: tuple[str, ...],
    seed: int,
    golden_dir: Path | None,
    as_json: bool,
) -> None:
    """ORT CPU latency, peak memory and size of MODEL, and of MODEL2 beside it as ratios."""
    report = bench_mod.bench(
        [model, *([model2] if model2 else [])],
        runs=runs,
        warmup=warmup,
        threads=threads,
        opt_level=opt_level,
        dims=parse_dims(dims),
        seed=seed,
        golden=golden_dir,
        progress=None if as_json else render.progress_printer(),
    )
    click.echo(json.dumps(report, indent=2) if as_json else bench_mod.text(report))


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@plugin_option
@handle_errors
def list_passes(as_json: bool, plugins: tuple[str, ...]) -> None:
    """List the passes and aliases, with their options."""
    load_plugins(plugins)
    listing = render.pass_listing()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
    else:
        click.echo(render.pass_listing_text(listing))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Folder.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Size of a symbolic dim.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--shapes", default=2, show_default=True, help="Cases when dims are symbolic.")
@click.option(
    "--inputs", "inputs_path", type=click.Path(path_type=Path), help="Your inputs (.npz)."
)
@with_options(common_tolerance)
@handle_errors
def golden(
    model: Path,
    output: Path,
    dims: tuple[str, ...],
    seed: int,
    shapes: int,
    inputs_path: Path | None,
    atol: float | None,
    rtol: float | None,
    tolerance_pairs: tuple[str, ...],
) -> None:
    """Capture a golden set (inputs, outputs, settings) from MODEL into the folder OUTPUT."""
    if shapes < 1:
        raise UsageError("--shapes must be at least 1")
    tolerances = parse_tolerances(tolerance_pairs, atol, rtol)
    loaded = model_io.load(model)
    captured = golden_mod.capture(
        loaded,
        inputs=load_inputs(str(inputs_path) if inputs_path else None),
        dims=parse_dims(dims),
        seed=seed,
        shapes=shapes,
    )
    captured.tolerances = tolerances
    folder = captured.save(output)
    shapes_text = "; ".join(
        ", ".join(f"{k}{list(v.shape)}" for k, v in case.items()) for case in captured.inputs
    )
    click.echo(f"golden set: {folder} ({len(captured.inputs)} case(s): {shapes_text})")


@cli.command()
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--golden", "golden_dir", type=click.Path(path_type=Path), help="Golden set folder.")
@click.option(
    "--kind",
    type=click.Choice(["exact", "approximate", "interface"]),
    default="exact",
    show_default=True,
    help="Which tolerance applies.",
)
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Symbolic dim for capture.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_options(common_tolerance)
@handle_errors
def verify(
    reference: Path,
    candidate: Path,
    golden_dir: Path | None,
    kind: str,
    dims: tuple[str, ...],
    as_json: bool,
    atol: float | None,
    rtol: float | None,
    tolerance_pairs: tuple[str, ...],
) -> None:
    """Check that CANDIDATE computes what REFERENCE computes (exit 3 if not)."""
    tolerances = parse_tolerances(tolerance_pairs, atol, rtol)
    ref_model, cand_model = model_io.load(reference), model_io.load(candidate)
    if golden_dir is not None:
        golden = onnxopt.GoldenSet.load(golden_dir)
        golden_mod.check_inputs(ref_model, golden.inputs)
    else:
        golden = golden_mod.capture(ref_model, dims=parse_dims(dims))
    golden_mod.check_inputs(cand_model, golden.inputs)
    tol = golden.tolerance(kind, tolerances.get(kind))
    metrics = compare_all(golden.outputs, ort_runner.run(cand_model, golden.inputs), tol)
    if as_json:
        click.echo(json.dumps({"tolerance": tol.describe(), **metrics.as_dict()}, indent=2))
    else:
        verdict = render.status_word("same" if metrics.passed else "DIFFERENT", render.use_color())
        click.echo(
            f"{verdict} ({tol.describe()}): max abs {metrics.max_abs:.3g}, "
            f"rel L2 {metrics.rel_l2:.3g}, cosine {metrics.cosine:.6f}, SNR {metrics.snr_db:.1f} dB"
        )
        if metrics.reason:
            click.echo(f"  {metrics.reason}")
    sys.exit(0 if metrics.passed else 3)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--target",
    "target_name",
    required=True,
    metavar="NAME|FILE",
    help="Target profile: a built-in name (onnx-13, ort-cpu, ...) or a .json/.toml file.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def check(model: Path, target_name: str, as_json: bool) -> None:
    """List what TARGET cannot run in MODEL and what `lower` can replace (exit 3 if anything)."""
    from onnxopt.targets import load_target
    from onnxopt.targets.check import unsupported

    target = load_target(target_name)
    findings = unsupported(model_io.load(model), target)
    if as_json:
        rows = [dict(dataclasses.asdict(f), op=f.op) for f in findings]
        click.echo(json.dumps({"target": target.name, "unsupported": rows}, indent=2))
    else:
        click.echo(render.findings_text(target, findings))
    sys.exit(3 if findings else 0)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def inspect(model: Path, as_json: bool) -> None:
    """Show MODEL's opsets, inputs and outputs, op histogram and parameters."""
    summary = render.model_summary(model_io.load(model), model)
    click.echo(json.dumps(summary, indent=2) if as_json else render.model_summary_text(summary))


def main() -> None:
    cli(prog_name="onnxopt")
