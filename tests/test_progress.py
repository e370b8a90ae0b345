"""Progress outside a terminal (a SLURM log, nohup, CI): a line every FIRSTSTAGE_PROGRESS_SECONDS (30 by default)
from train, evaluate and encode, written by a timer even while nothing finishes."""

from __future__ import annotations

import io
import re
import time

import pytest

from harness import ForkedStage
from helpers import TINY
from pipeline.progress import Progress


def test_a_progress_line_comes_every_interval_even_without_updates():
    out = io.StringIO()  # not a terminal
    with Progress("train", 100, "step", interval=0.2, file=out) as bar:
        bar.update(10, loss=0.1234)
        time.sleep(0.9)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3  # a line per 0.2 s although nothing moved after the first update
    assert lines[0].startswith("train: step 10/100 (10%), loss 0.1234") and "ETA" in lines[0]


def elapsed(line: str) -> int:
    h, m, s = re.search(r"elapsed (\d+):(\d\d):(\d\d)", line).groups()
    return 3600 * int(h) + 60 * int(m) + int(s)


@pytest.mark.parametrize("stage", ["train", "evaluate", "encode"])
def test_train_evaluate_and_encode_write_progress_lines_into_a_log_file(stage, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("FIRSTSTAGE_PROGRESS_SECONDS", "0.1")
    args = {"train": [*TINY, f"data.train={tiny_run / 'train'}", f"output_dir={tmp_path / 'run'}",
                      "train.max_steps=12", "train.tracker=none"],
            "evaluate": ["--model", tiny_run / "run", "--data", tiny_run / "val", "--output", tmp_path / "e",
                         "--lpips-backbone", "random", "evaluate.likelihood_samples=8", "data.num_workers=0"],
            "encode": ["--model", tiny_run / "run", "--data", tiny_run / "train", "--output", tmp_path / "lat",
                       "data.num_workers=0", "encode.batch_size=1"]}[stage]
    proc = ForkedStage(f"stages.{stage}", *args)  # stdout and stderr go to files, as under SLURM
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{stage}: ") and "elapsed" in ln]
    assert len(lines) >= 2, err[-2000:]
    assert re.match(rf"{stage}: .*?(\d+)/\1 \(100%\)", lines[-1]), lines  # the last line: where the loop got to
    times = [elapsed(ln) for ln in lines]
    assert all(b - a <= 2 for a, b in zip(times, times[1:]))  # never a silent stretch longer than the interval
    assert out.startswith(f"firststage {stage}: 1 thread (FIRSTSTAGE_THREADS=1)")  # its first line: the threads
    if stage == "evaluate":  # the line names its phase; each phase's last line shows it advanced to its end
        assert any(ln.startswith("evaluate: reconstruction: sample ") for ln in lines), err[-2000:]
        bounds = [ln for ln in lines if ln.startswith("evaluate: likelihood bounds: draw ")]
        assert bounds and re.match(r"evaluate: likelihood bounds: draw (\d+)/\1 \(100%\), .*k (\d+) of \2, images (\d+)/\3",
                                   bounds[-1]), bounds


def test_the_diffusability_probe_names_each_transform_before_its_decode():
    import torch

    from pipeline.metrics.diffusability import DiffusabilityProbe

    told = []
    probe = DiffusabilityProbe(4, 4)
    probe.add(lambda z: z[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2), torch.zeros(2, 4, 4, 4),
              torch.zeros(2, 3, 8, 8), 2, lambda name, i, n: told.append((name, i, n)))
    assert told == [("scale_1/2", 1, 4), ("rot90", 2, 4), ("rot180", 3, 4), ("rot270", 4, 4)]
