"""kprune.plot: every figure renders headless, and the CLI writes its pictures."""

import dataclasses
import sys

import keras
import pytest
from keras import layers as L

import kprune
from kprune import plot
from kprune.errors import KprunError
from kprune.tools.cli import main

pytest.importorskip("matplotlib")


def small_cnn(name="cnn"):
    inp = keras.Input((16, 16, 3))
    x = inp
    for filters in (8, 16, 16):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.ReLU()(x)
        x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10)(x), name=name)


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(0)
    model = small_cnn()
    return model, kprune.prune(model, flops_target=0.5)


def _rendered(figure, path):
    """Save as PNG with Agg; the file is a non-empty PNG and every main axes has a title."""
    from matplotlib.figure import Figure

    assert isinstance(figure, Figure)
    figure.savefig(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    title = figure.axes[0].get_title()
    assert title
    assert figure.axes[0].get_xlabel() and figure.axes[0].get_ylabel()
    return title


def test_channels_before_and_after(models, tmp_path):
    model, small = models
    figure = plot.channels(model, small)
    title = _rendered(figure, tmp_path / "channels.png")
    assert title.startswith("Output channels per layer")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["original", "pruned"]
    widths = [int(p.get_height()) for p in ax.patches]
    n = len(widths) // 2
    assert widths[:n] == [8, 16, 16, 10]                   # the original model's widths
    assert all(a <= b for a, b in zip(widths[n:], widths[:n]))
    assert sum(widths[n:]) < sum(widths[:n])
    # A profile does as well as a model, and one model draws alone.
    assert plot.channels(kprune.profile(model)).axes[0].get_title() == \
        "Output channels per layer"


def test_macs_share_sums_to_100(models, tmp_path):
    model, _ = models
    figure = plot.macs_share(model)
    assert _rendered(figure, tmp_path / "macs.png").startswith("Share of the MACs")
    heights = [p.get_height() for p in figure.axes[0].patches]
    assert sum(heights) == pytest.approx(100.0)
    few = plot.macs_share(model, top=2).axes[0]
    assert len(few.patches) == 2 and "others" in few.get_xticklabels()[-1].get_text()


def test_overview_has_two_axes(models, tmp_path):
    figure = plot.overview(models[0])
    _rendered(figure, tmp_path / "overview.png")
    assert figure.axes[1].get_title() == "Output channels per layer"


def test_mask_schedule_from_a_scheduler(tmp_path):
    keras.utils.set_random_seed(0)
    rr = kprune.resrep.attach(small_cnn(), lam=1e-3)
    scheduler = kprune.resrep.MaskScheduler(0.5, warmup_steps=0, interval=1, granularity=4)
    scheduler.set_model(rr)
    for _ in range(3):
        scheduler.update()
    assert len(scheduler.history) == 3
    masked = [row[2] for row in scheduler.history]
    ratios = [row[1] for row in scheduler.history]
    assert masked[0] == 4 and masked == sorted(masked)        # at most 4 more per update
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] <= 0.5
    assert scheduler.history[-1][1] == pytest.approx(scheduler.macs_ratio)
    figure = plot.mask_schedule(scheduler)
    assert _rendered(figure, tmp_path / "schedule.png") == "ResRep mask schedule"
    assert figure.axes[1].get_ylabel() == "masked channels"
    # A plain list of (step, macs_ratio, masked) draws too; an empty one says why not.
    assert plot.mask_schedule([(1, 0.9, 2), (2, 0.8, 4)]).axes[0].get_title()
    with pytest.raises(KprunError, match="no updates"):
        plot.mask_schedule(kprune.resrep.MaskScheduler(0.5))


@dataclasses.dataclass
class FakeSensitivity:
    table: dict
    baseline: float


TABLE = {0: {0.25: 0.95, 0.5: 0.90, 0.75: 0.70}, 3: {0.25: 0.96, 0.5: 0.95, 0.75: 0.93}}


@pytest.mark.parametrize("result", [FakeSensitivity(TABLE, 0.96),
                                    {"table": TABLE, "baseline": 0.96}, TABLE],
                         ids=["object", "dict", "table"])
def test_sensitivity(result, tmp_path):
    figure = plot.sensitivity(result)
    assert _rendered(figure, tmp_path / "sens.png").startswith("Sensitivity")
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["0", "3"]
    assert ("unpruned" in labels) == (result is not TABLE)
    assert list(ax.lines[0].get_xdata()) == [0.25, 0.5, 0.75]
    with pytest.raises(KprunError):
        plot.sensitivity(42)


def test_tradeoff(tmp_path):
    results = [("l1", 0.7, 0.93), ("l1", 0.5, 0.90),
               {"name": "fpgm", "cost": 0.5, "accuracy": 0.91}]
    figure = plot.tradeoff(results, cost="MACs (share of original)")
    assert _rendered(figure, tmp_path / "tradeoff.png") == \
        "Accuracy against MACs (share of original)"
    ax = figure.axes[0]
    assert ax.get_xlabel() == "MACs (share of original)"
    assert list(ax.lines[0].get_xdata()) == [0.5, 0.7]     # sorted by cost
    with pytest.raises(KprunError, match="name"):
        plot.tradeoff([{"cost": 1, "accuracy": 2}])


def test_no_pyplot_and_backend_left_alone(models):
    import matplotlib

    backend, had_pyplot = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    plot.channels(*models)
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_missing_matplotlib_says_how_to_install(models, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # import now fails
    with pytest.raises(KprunError, match=r"pip install kprune\[plot\]"):
        plot.channels(*models)
    path = tmp_path / "m.keras"
    models[0].save(path)
    assert main(["profile", str(path), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kprune: error: ") and "pip install kprune[plot]" in err
    assert not (tmp_path / "p.png").exists()


def test_cli_profile_plot_and_prune_report(models, tmp_path, capsys):
    model, _ = models
    path = str(tmp_path / "model.keras")
    model.save(path)
    picture = tmp_path / "out" / "profile.png"
    assert main(["profile", path, "--plot", str(picture)]) == 0
    assert f"wrote {picture}" in capsys.readouterr().out
    assert picture.read_bytes()[:4] == b"\x89PNG"

    report = tmp_path / "channels.png"
    small = str(tmp_path / "small.keras")
    assert main(["prune", path, "-o", small, "--flops-target", "0.5", "--report", str(report)]) == 0
    assert f"wrote {report}" in capsys.readouterr().out
    assert report.read_bytes()[:4] == b"\x89PNG" and report.stat().st_size > 2000

    assert main(["profile", path, "--plot", str(tmp_path / "profile.txt")]) == 2
    assert "--plot writes a picture" in capsys.readouterr().err
