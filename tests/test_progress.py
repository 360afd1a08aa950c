"""Progress a log can see: a bar on a terminal, lines with the rate and ETA elsewhere."""
import io
import re

import numpy as np
import pytest
import torch

from gpu_dsm.progress import format_duration, progress

LINE = re.compile(r"^(?P<desc>[\w ]+): (?P<count>\d+)/(?P<total>\d+) img \((?P<pct>\d+)%\), (?P<rate>[\d.]+) img/s, "
                  r"(ETA (?P<eta>.+)|done in .+)$")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_line_per_tenth_with_rate_and_eta(capsys):
    clock = _Clock()
    with progress(20, "extract", clock=clock) as bar:  # stderr: captured, not a terminal
        for _ in range(20):
            clock.now += 2.0  # 0.5 images per second
            bar.update(1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10, lines  # at 2, 4, ..., 20 images
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m["count"]) for m in parsed] == list(range(2, 21, 2))
    assert {float(m["rate"]) for m in parsed} == {0.5}
    assert parsed[0]["eta"] == format_duration(18 / 0.5) == "36 s"
    assert lines[-1] == "extract: 20/20 img (100%), 0.50 img/s, done in 40 s"


def test_a_line_every_30_seconds_of_a_long_run():
    clock, stream = _Clock(), io.StringIO()
    bar = progress(1000, "HOW", stream=stream, clock=clock)
    for _ in range(10):
        clock.now += 16.0  # far below a tenth of the total: a line when 30 s have passed
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [LINE.match(line)["count"] for line in lines] == ["2", "4", "6", "8", "10"]
    assert lines[0] == "HOW: 2/1000 img (0%), 0.06 img/s, ETA 4 h 26 min"  # 998 images at 1/16 img/s: 15968 s


def test_disabled_and_terminal(capsys):
    with progress(5, "quiet", enabled=False) as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""
    terminal = _Terminal()
    with progress(5, "bar", stream=terminal) as bar:
        bar.update(5)
    assert "bar" in terminal.getvalue() and "ETA" not in terminal.getvalue()  # tqdm's bar, not log lines
    assert format_duration(3725) == "1 h 02 min" and format_duration(125) == "2 min 05 s"
    with pytest.raises(ValueError, match="every_fraction"):
        progress(5, "x", every_fraction=0)


def _images(n):
    g = np.random.default_rng(0)
    return [g.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_extraction_and_how_report_progress_in_a_log(lite0, capsys):
    from gpu_dsm.extract import ExtractConfig, iterate_activations
    from gpu_dsm.how import HOWConfig, describe_how
    from gpu_dsm.whitening import Whitening

    images = _images(3)
    batches = list(iterate_activations(lite0, images, ExtractConfig(image_size=64, scales=(1.0,)), desc="db"))
    assert sum(len(b.indices) for b in batches) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert [LINE.match(line)["count"] for line in lines] == ["1", "2", "3"] and lines[0].startswith("db: 1/3 img (33%)")
    list(iterate_activations(lite0, images, ExtractConfig(image_size=64, scales=(1.0,), progress=False)))
    assert capsys.readouterr().err == ""

    k = 112  # EfficientNet-Lite0's HOW layer (gpu_dsm.backbones.layers.HOW_LAYERS)
    whitening = Whitening(projection=torch.eye(k)[:16], bias=torch.zeros(16))
    features = describe_how(lite0, images, whitening, HOWConfig(image_size=64, scales=(1.0,), dim=16, num_features=5))
    assert features.num_images == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(LINE.match(line)["desc"] == "HOW" for line in lines)
