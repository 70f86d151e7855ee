"""python -m acnet_pl.report: mean +- std per (model, block) and the ACB gain, from a sweep's job dirs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from acnet_pl.report import collect_runs, format_table, main, summarize


def _job(sweep: Path, num: int, model: str, block: str, seed: int, top1: float, ok: bool = True) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / "deploy").mkdir()
    (job / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nmodel:\n  name: {model}\nblock:\n  block: {block}\n"
        "data:\n  _target_: acnet_pl.data.CIFAR10DataModule\n"
    )
    report = {
        "ok": ok,
        "model": {"name": model, "num_classes": 10},
        "block": {"name": block},
        "val": {"before": {"top1": top1}, "after": {"top1": top1}},
    }
    (job / "deploy" / "report.json").write_text(json.dumps(report))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    values = {"base": [0.90, 0.92, 0.91], "acb": [0.93, 0.94, 0.95]}
    num = 0
    for block, accs in values.items():
        for seed, acc in enumerate(accs):
            _job(root, num, "resnet56", block, seed, acc)
            num += 1
    _job(root, num, "resnet56", "acb", 9, 0.10, ok=False)  # a failed deploy check: left out
    return root


def test_summary_numbers(sweep: Path) -> None:
    runs = collect_runs(sweep)
    assert len(runs) == 7 and {r["data"] for r in runs} == {"cifar10"}
    groups, gains = summarize(runs)
    assert [(g["model"], g["block"], g["n"]) for g in groups] == [
        ("resnet56", "base", 3),
        ("resnet56", "acb", 3),
    ]
    base, acb = groups
    assert base["mean"] == pytest.approx(91.0) and acb["mean"] == pytest.approx(94.0)
    assert base["std"] == pytest.approx(statistics.stdev([90.0, 92.0, 91.0]))  # sample std: 1.0
    assert acb["std"] == pytest.approx(1.0)
    assert gains == [{"data": "cifar10", "model": "resnet56", "block": "acb", "gain": pytest.approx(3.0)}]
    table = format_table(runs)
    assert "91.00 +- 1.00" in table and "94.00 +- 1.00" in table
    assert "ACB gain on cifar10 resnet56: +3.00" in table
    assert "left out" in table and "6" in table.splitlines()[-1]


def test_single_run_has_zero_std(tmp_path: Path) -> None:
    _job(tmp_path / "s", 0, "vgg16", "base", 0, 0.5)
    groups, gains = summarize(collect_runs(tmp_path / "s"))
    assert (groups[0]["mean"], groups[0]["std"], gains) == (50.0, 0.0, [])


def test_main_json(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gains"][0]["gain"] == pytest.approx(3.0)


def test_dir_without_runs_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "acnet_pl.report", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no runs found under") and len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_missing_dir_and_bad_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "0" / "deploy").mkdir(parents=True)
    (tmp_path / "0" / "deploy" / "report.json").write_text("{broken")
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "not valid JSON" in capsys.readouterr().err
