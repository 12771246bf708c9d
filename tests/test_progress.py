"""Progress: a bar on a terminal, plain lines at a known cadence (no carriage return) everywhere else."""

from __future__ import annotations

import io
import re

import pytest
import torch

from smoothcert.progress import LineProgress, NullProgress, format_seconds, progress

LINE = re.compile(r"^(\w+: )?(\d+)/(\d+) \w+s \((\d+)%\), ([0-9.e+-]+|nan) \w+s/s, elapsed ([0-9:]+), ETA ([0-9:?]+)")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert "\r" not in text
    return text.splitlines()


def test_lines_every_five_percent_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(100, desc="certify", unit="input", file=out, clock=clock)
    for _ in range(100):
        clock.t += 0.1
        bar.update(1)
    bar.close()
    lines = _lines(out)
    done = [int(LINE.match(line).group(2)) for line in lines]
    assert done == list(range(5, 101, 5))            # 19 lines at 5%, 10%, ..., 95% and one at the end
    half = lines[9]
    assert half.startswith("certify: 50/100 inputs (50%), 10 inputs/s, elapsed 0:05, ETA 0:05")
    assert lines[-1].startswith("certify: 100/100 inputs (100%)") and lines[-1].endswith("ETA 0:00")


def test_a_line_every_interval_when_progress_is_slow():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(1000, unit="batch", file=out, clock=clock, interval=30.0)
    for _ in range(12):
        clock.t += 10.0
        bar.update(1)
    times = [int(LINE.match(line).group(2)) * 10 for line in _lines(out)]
    assert times == [30, 60, 90, 120]                 # 1.2% done: only the 30-second rule fires
    bar.close()
    assert len(_lines(out)) == 5                      # and the final line


def test_a_resumed_stage_counts_its_rate_from_the_new_items_only():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(200, initial=100, unit="input", file=out, clock=clock, percent=10)
    for _ in range(20):
        clock.t += 1.0
        bar.update(1)
    first = LINE.match(_lines(out)[0])
    assert first.group(2) == "120" and float(first.group(5)) == pytest.approx(1.0) and first.group(7) == "1:20"
    assert LineProgress(200, initial=100, file=io.StringIO(), clock=clock).line().endswith("ETA ?")


def test_postfix_is_appended_and_no_line_without_progress():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(10, desc="train", unit="batch", file=out, clock=clock, percent=50)
    bar.set_postfix(epoch="1/2", loss="0.5")
    clock.t = 1.0
    bar.update(5)
    assert _lines(out) == ["train: 5/10 batches (50%), 5 batches/s, elapsed 0:01, ETA 0:01, epoch=1/2, loss=0.5"]
    quiet = io.StringIO()
    LineProgress(10, file=quiet, clock=clock).close()
    assert quiet.getvalue() == ""


def test_auto_mode_picks_a_bar_on_a_terminal_and_lines_elsewhere():
    assert isinstance(progress(10, file=io.StringIO()), LineProgress)
    assert isinstance(progress(10, enabled=False), NullProgress)
    assert isinstance(progress(10, mode="off", file=Terminal()), NullProgress)
    tty = Terminal()
    bar = progress(10, desc="certify", unit="input", file=tty)
    assert not isinstance(bar, LineProgress)
    bar.update(10)
    bar.close()
    assert "\r" in tty.getvalue() and "10/10" in tty.getvalue()
    with pytest.raises(ValueError, match="progress mode"):
        progress(10, mode="fancy")
    with pytest.raises(ValueError, match="percent"):
        LineProgress(10, percent=0)


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3600, 3725)] == ["0:00", "0:59", "1:01", "1:00:00", "1:02:05"]
    assert format_seconds(float("nan")) == "?" and format_seconds(float("inf")) == "?"


def test_the_runner_and_the_training_loop_write_lines_to_a_log(tmp_path, capsys):
    from smoothcert.cli.runner import ResultsFile, run_dataset
    from smoothcert.methods.records import Prediction
    from smoothcert.models.architectures import build_model
    from smoothcert.training.loop import train

    x = torch.rand(40, 2)
    results = ResultsFile(tmp_path / "p.tsv", ("idx", "label", "predict", "correct", "time"), {"command": "predict"})
    run_dataset(results, lambda idx: (x[list(idx)], torch.zeros(len(idx), dtype=torch.int64)), list(range(40)),
                lambda xb, yb, idx: [Prediction(0) for _ in idx], inputs_per_batch=4)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [int(LINE.match(line).group(2)) for line in err.splitlines()] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert err.startswith("predict: 4/40 inputs (10%)")

    class Data:
        inputs, labels = x, (x[:, 0] > 0.5).long()

        def __len__(self):
            return 40

    torch.manual_seed(0)
    train(build_model("mlp", num_classes=2, input_shape=(2,)), Data(), sigma=0.1, epochs=2, batch_size=10)
    captured = capsys.readouterr()
    assert "\r" not in captured.err
    steps = [int(LINE.match(line).group(2)) for line in captured.err.splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8] and "epoch=2/2" in captured.err.splitlines()[-1]
    assert [line.split(":")[0] for line in captured.out.splitlines()] == ["epoch 1/2", "epoch 2/2"]


@pytest.mark.skipif(not hasattr(__import__("os"), "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_of_no_width_gets_lines_and_a_sized_one_a_bar():
    import fcntl
    import os
    import struct
    import termios

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as stream:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        assert isinstance(progress(10, file=stream), LineProgress)     # tqdm would draw nothing there
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        bar = progress(10, file=stream)
        assert not isinstance(bar, LineProgress)
        bar.close()
    os.close(master)
