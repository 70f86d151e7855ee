"""The sweep table (python -m acnet_pl.cli.sweep_table): mean +- std per (model, block, swept setting) and the ACB gain, from job dirs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from acnet_pl.cli.sweep_table import collect_runs, format_sweep_table, main, summarize, varying_overrides
from acnet_pl.deploy.report import REPORT_FORMAT, REPORT_VERSION

SQRT2 = math.sqrt(2.0)


def _job(
    sweep: Path,
    num: int,
    block: str,
    seed: int,
    top1: float | None,
    lr: float | None = None,
    ok: bool = True,
    fmt: str = REPORT_FORMAT,
    tool: str = "FuseCallback",
) -> None:
    """A multirun job dir as train.py leaves it: .hydra/config.yaml, .hydra/overrides.yaml, deploy/report.json."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / "deploy").mkdir()
    (job / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nmodel:\n  name: resnet56\nblock:\n  name: {block}\n"
        "data:\n  _target_: acnet_pl.data.CIFAR10DataModule\n"
    )
    overrides = ["experiment=cifar10_resnet56", f"block={block}", f"seed={seed}", "~callbacks.lr_monitor"]
    if lr is not None:
        overrides.append(f"optimizer.lr={lr}")
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    report = {
        "format": fmt,
        "version": REPORT_VERSION,
        "tool": tool,
        "ok": ok,
        "model": {"name": "resnet56", "num_classes": 10},
        "block": {"name": block},
    }
    if top1 is not None:
        report["val"] = {"before": {"top1": top1}, "after": {"top1": top1}}
    (job / "deploy" / "report.json").write_text(json.dumps(report))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """`block=base,acb optimizer.lr=0.1,0.2 seed=0,1`, plus three jobs whose report cannot be averaged."""
    root = tmp_path / "sweep"
    top1 = {  # (lr, block) -> top-1 of seeds 0 and 1
        (0.1, "base"): [0.90, 0.92],
        (0.1, "acb"): [0.93, 0.95],
        (0.2, "base"): [0.80, 0.84],
        (0.2, "acb"): [0.86, 0.86],
    }
    num = 0
    for (lr, block), accs in top1.items():
        for seed, acc in enumerate(accs):
            _job(root, num, block, seed, acc, lr=lr)
            num += 1
    _job(root, 8, "acb", 2, 0.10, lr=0.1, ok=False)  # the fused model failed its check
    _job(root, 9, "acb", 3, None, lr=0.1, tool="deploy.py")  # deploy.py's report: no validation accuracy
    _job(root, 10, "base", 4, math.nan, lr=0.2)  # NaN top-1 (JSON NaN, what Python writes)
    return root


def test_groups_by_swept_override_and_gain_within_each(sweep: Path) -> None:
    runs = collect_runs(sweep)
    assert len(runs) == 11 and {r["data"] for r in runs} == {"cifar10"}
    assert varying_overrides(runs) == ["optimizer.lr"]  # seed varies too, but is what a group averages over
    groups, gains = summarize(runs)
    got = [(g["block"], g["setting"], g["n"], round(g["mean"], 9), round(g["std"], 9)) for g in groups]
    assert got == [
        ("base", "optimizer.lr=0.1", 2, 91.0, round(SQRT2, 9)),
        ("acb", "optimizer.lr=0.1", 2, 94.0, round(SQRT2, 9)),
        ("base", "optimizer.lr=0.2", 2, 82.0, round(2 * SQRT2, 9)),
        ("acb", "optimizer.lr=0.2", 2, 86.0, 0.0),
    ]
    assert groups[0]["overrides"] == {"optimizer.lr": "0.1"}
    # Gains within one lr: +3 and +4 (averaging over lr, as before, would give one gain of +3.5).
    assert [(g["setting"], round(g["gain"], 9)) for g in gains] == [
        ("optimizer.lr=0.1", 3.0),
        ("optimizer.lr=0.2", 4.0),
    ]


def test_table_numbers_and_left_out_notes(sweep: Path) -> None:
    lines = format_sweep_table(collect_runs(sweep)).splitlines()
    assert lines[0].split() == ["data", "model", "block", "setting", "runs", "val", "top-1", "(%)"]
    assert [line.split() for line in lines[2:6]] == [
        ["cifar10", "resnet56", "base", "optimizer.lr=0.1", "2", "91.00", "+-", "1.41"],
        ["cifar10", "resnet56", "acb", "optimizer.lr=0.1", "2", "94.00", "+-", "1.41"],
        ["cifar10", "resnet56", "base", "optimizer.lr=0.2", "2", "82.00", "+-", "2.83"],
        ["cifar10", "resnet56", "acb", "optimizer.lr=0.2", "2", "86.00", "+-", "0.00"],
    ]
    assert lines[6:8] == [
        "ACB gain on cifar10 resnet56 optimizer.lr=0.1: +3.00",
        "ACB gain on cifar10 resnet56 optimizer.lr=0.2: +4.00",
    ]
    assert lines[8:] == [
        "left out 10: deploy/report.json has no val top-1",
        "left out 8: the fused model failed its check",
        "left out 9: deploy/report.json holds no validation accuracy (written by deploy.py, which checks "
        "outputs only); the fuse callback's report of the run has it",
    ]


def test_without_swept_settings_there_is_no_setting_column(tmp_path: Path) -> None:
    for num, (block, seed, top1) in enumerate([("base", 0, 0.5), ("acb", 0, 0.6), ("acb", 1, 0.7)]):
        _job(tmp_path / "s", num, block, seed, top1)
    runs = collect_runs(tmp_path / "s")
    groups, gains = summarize(runs)
    assert [(g["block"], g["setting"], g["n"]) for g in groups] == [("base", "", 1), ("acb", "", 2)]
    assert (groups[0]["mean"], groups[0]["std"]) == (50.0, 0.0)  # one run: std 0
    assert groups[1]["mean"] == pytest.approx(65.0, abs=1e-9)
    assert groups[1]["std"] == pytest.approx(0.1 * 100 / SQRT2, abs=1e-9)
    assert gains[0]["gain"] == pytest.approx(15.0, abs=1e-9)
    lines = format_sweep_table(runs).splitlines()
    assert "setting" not in lines[0]
    assert lines[-1] == "ACB gain on cifar10 resnet56: +15.00"


def test_only_unusable_reports_give_a_table_not_a_crash(tmp_path: Path) -> None:
    _job(tmp_path / "s", 0, "acb", 0, 0.5, fmt="something-else")
    assert format_sweep_table(collect_runs(tmp_path / "s")).splitlines()[2:] == [
        "left out 0: deploy/report.json has format 'something-else', not 'acnet-pl-deploy-report'"
    ]


def test_main_json(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # strict JSON: NaN top-1 is written as null
    assert [round(g["gain"], 9) for g in out["gains"]] == [3.0, 4.0]
    assert {r["job"]: r["top1"] for r in out["runs"]}["10"] is None


@pytest.mark.slow
def test_dir_without_runs_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "acnet_pl.cli.sweep_table", str(tmp_path)],
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


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("diverged", "training diverged"),
        ("not_trained", "no training step was taken"),
        ("refused", "failed its check"),
    ],
)
def test_a_stopped_run_is_left_out_with_its_reason(tmp_path: Path, status: str, reason: str) -> None:
    _job(tmp_path, 0, "acb", 0, None, ok=False)
    path = tmp_path / "0" / "deploy" / "report.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": status, "val": None}))
    (run,) = collect_runs(tmp_path)
    assert run["top1"] is None and reason in run["left_out"]
