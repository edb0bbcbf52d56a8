"""Charts: the loss curve `letterpress train` writes beside metrics.jsonl, `letterpress plot-metrics`, and the
benchmark chart helpers. Checked as files (PNG signature, a sane size); how they read was checked by eye."""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path

import pytest

from letterpress import plots
from letterpress.cli import main as cli_main
from letterpress.train.trainer import Trainer

from .train_fixtures import addition_lines, make_checkpoint, make_tokenizer, write_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, checking its signature and that the IHDR chunk comes first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return make_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", tok)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", addition_lines(32))


def synthetic_metrics(path: Path) -> Path:
    lines = [json.dumps({"step": s, "loss": 10 / s, "diffusion": 5 / s, "encoder": 5 / s, "lr": 1e-3 * min(1, s / 20),
                         "steps_averaged": 10}) for s in range(10, 210, 10)]
    lines += [json.dumps({"step": s, "eval_loss": 12 / s, "eval_examples": 64}) for s in (50, 100, 150, 200)]
    path.write_text("\n".join(lines) + '\n{"step": 210, "loss": 0.0')  # a torn last line (run killed mid-write)
    return path


def test_loss_curve_of_a_synthetic_metrics_file(tmp_path):
    metrics = synthetic_metrics(tmp_path / "metrics.jsonl")
    records = plots.read_metrics(metrics)
    assert len(records) == 24 and records[-1] == {"step": 200, "eval_loss": 0.06, "eval_examples": 64}
    out = plots.plot_metrics_file(metrics)
    assert out == tmp_path / "loss.png"
    width, height = png_size(out)
    assert width >= 600 and height >= 400 and 5_000 < out.stat().st_size < 200_000
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # atomic write left nothing


def test_loss_curve_refuses_metrics_without_a_loss(tmp_path):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text('{"step": 1, "tokens": 3}\n')
    with pytest.raises(plots.PlotError, match="no loss"):
        plots.plot_metrics_file(empty)
    with pytest.raises(plots.PlotError, match="cannot read"):
        plots.read_metrics(tmp_path / "missing.jsonl")
    (tmp_path / "binary").write_bytes(b"\xbe\x00\xff")
    with pytest.raises(plots.PlotError, match="not a metrics.jsonl"):
        plots.read_metrics(tmp_path / "binary")


def test_benchmark_charts(tmp_path):
    line = plots.line_chart([1, 8, 32], {"tokens/s": [249.6, 365.6, 288.5]}, tmp_path / "a" / "line.png",
                            title="t", xlabel="x", ylabel="y", log_x=True)
    bars = plots.bar_chart(["50-60"], {"diffusion": [0.95], "autoregressive": [0.325]}, tmp_path / "bars.png",
                           title="t", xlabel="x", ylabel="y", percent=True)
    assert png_size(line) and png_size(bars)


def test_train_writes_loss_png_beside_metrics(tmp_path, base_dir, data_file):
    from letterpress.train.trainer import TrainConfig

    cfg = TrainConfig(model=str(base_dir), data=str(data_file), eval_fraction=0.25, output_dir=str(tmp_path / "out"),
                      steps=3, batch_size=4, lr=5e-3, warmup_steps=1, log_every=1, device="cpu", progress=False)
    assert Trainer(cfg).train().finished
    out = tmp_path / "out"
    assert (out / "metrics.jsonl").is_file()
    width, _ = png_size(out / "loss.png")
    assert width > 0 and (out / "loss.png").stat().st_size > 0


def test_a_plotting_failure_never_stops_training(tmp_path, base_dir, data_file, monkeypatch, caplog):
    from letterpress.train.trainer import TrainConfig

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "plot_metrics_file", broken)
    cfg = TrainConfig(model=str(base_dir), data=str(data_file), output_dir=str(tmp_path / "out"), steps=2,
                      batch_size=4, lr=5e-3, warmup_steps=1, log_every=1, device="cpu", progress=False)
    with caplog.at_level(logging.WARNING, logger="letterpress.train.trainer"):
        assert Trainer(cfg).train().finished
    warnings = [r for r in caplog.records if "could not draw" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()  # once, not per log line
    assert not (tmp_path / "out" / "loss.png").exists()


def block_matplotlib(monkeypatch) -> None:
    """Make every import of matplotlib fail, as in an environment without it."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_no_plot_never_imports_matplotlib(tmp_path, base_dir, data_file, monkeypatch, caplog):
    block_matplotlib(monkeypatch)  # an import attempt would fail and be reported as a warning
    args = ["train", "--model", str(base_dir), "--data", str(data_file), "--steps", "2", "--batch-size", "4",
            "--log-every", "1", "--no-progress", "--device", "cpu"]
    with caplog.at_level(logging.WARNING, logger="letterpress.train.trainer"):
        assert cli_main(args + ["--output", str(tmp_path / "off"), "--no-plot"]) == 0
        assert not [r for r in caplog.records if "could not draw" in r.getMessage()]
        # without matplotlib (and plotting on) training still finishes, and says how to get the chart
        assert cli_main(args + ["--output", str(tmp_path / "on")]) == 0
    [warning] = [r.getMessage() for r in caplog.records if "could not draw" in r.getMessage()]
    assert "pip install matplotlib" in warning
    for run in ("off", "on"):
        assert (tmp_path / run / "metrics.jsonl").is_file() and not (tmp_path / run / "loss.png").exists()


def test_cli_plot_metrics(tmp_path, capsys):
    metrics = synthetic_metrics(tmp_path / "run" / "metrics.jsonl") if (tmp_path / "run").mkdir() is None else None
    assert cli_main(["plot-metrics", str(metrics), "-o", str(tmp_path / "curve.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curve.png")
    png_size(tmp_path / "curve.png")
    assert cli_main(["plot-metrics", str(tmp_path / "run")]) == 0  # a run folder: its metrics.jsonl, loss.png beside
    png_size(tmp_path / "run" / "loss.png")
    assert cli_main(["plot-metrics", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read")


def test_cli_import_and_parser_leave_matplotlib_out():
    import subprocess

    code = ("import sys\nfrom letterpress.cli import build_parser\nbuild_parser()\n"
            "assert not [m for m in sys.modules if m.startswith(('matplotlib', 'torch'))], 'heavy import'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
