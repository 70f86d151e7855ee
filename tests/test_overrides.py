"""check_overrides (acnet_pl.launch.overrides): config mistakes on the command line become one line."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR

import acnet_pl.deploy.config  # noqa: F401 - registers deploy.yaml's options, as deploy.py does
from acnet_pl.launch.overrides import check_overrides

MODELS = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))  # every choice, sorted


@pytest.fixture(autouse=True)
def _launching_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "block=base,acb", "seed=0,1,2"],
        ["--multirun", "model=resnet20,resnet32", "seed=range(0,3)", "hydra/launcher=basic"],
        ["-m", "block=glob(*)", "experiment=quickstart"],
        ["hparams_search=optuna", "experiment=cifar10_resnet56", "hydra.sweeper.n_trials=3"],
        ["hparams_search=optuna", "optimizer.lr=interval(0.05,0.2)", "block=base,acb"],
        ["experiment=quickstart", "++trainer.limit_train_batches=2", "hydra.run.dir=run", "~callbacks.fuse"],
        ["--cfg", "job", "--resolve", "model=resnet56"],
        ["debug=fdr"],  # a group with a null default: no "+" needed
        ["experiment=quickstart", "debug=limit", "+trainer.overfit_batches=3"],  # a "+" a _target_ reads
        [
            "block=custom",
            "block.name=mypkg.blocks:MyBlock",
            "+block.channels=8",
        ],  # an option convert passes on
        [
            "-m",
            "experiment=cifar10_wrn16_8",
            "block=base,acb,dbb",
            "block.gamma_init=0.5",
        ],  # every block has it
        ["--help", "model=foo"],  # Hydra's help, left alone
        ["--config-dir", "/elsewhere", "model=foo"],  # another search path: left to Hydra
        ["--unknown-flag", "model=foo"],  # Hydra says what is wrong with the flag
        [],
    ],
)
def test_valid_or_foreign_command_lines_pass(argv: list[str]) -> None:
    assert check_overrides("train", CONF_DIR, argv) is None


@pytest.mark.parametrize(
    ("config", "argv", "expected"),
    [
        ("train", ["model=foo"], f"model=foo: no such choice in conf/model; choose one of: {MODELS}"),
        (
            "train",
            ["hydra/launcher=foo"],
            "hydra/launcher=foo: no such choice in conf/hydra/launcher; choose one of: basic, slurm,",
        ),
        (
            "train",
            ["trainer.foo=1"],
            "trainer.foo=1: no such key in the config; check the spelling (--cfg job prints the config), "
            "or pass a new argument to lightning.pytorch.Trainer with +trainer.foo=1",
        ),
        ("deploy", ["foo=1"], "foo=1: no such key in the config; check the spelling"),
        # issue 9: a typo gets "did you mean" from the composed config, also across nodes and for groups
        (
            "train",
            ["trainer.max_epoch=3"],
            "trainer.max_epoch=3: no such key in the config; did you mean trainer.max_epochs=3?",
        ),
        (
            "train",
            ["max_epochs=3"],
            "max_epochs=3: no such key in the config; did you mean trainer.max_epochs=3?",
        ),
        (
            "train",
            ["experimnt=quickstart"],
            "experimnt=quickstart: no such key in the config; did you mean experiment=quickstart?",
        ),
        (
            "train",
            ["debug=fdrr"],
            "debug=fdrr: no such choice in conf/debug; choose one of: default, fdr, limit, overfit, profiler",
        ),
        # never a "+" that is accepted and then ignored
        ("train", ["+foo=1"], "+foo=1: nothing reads foo (a new key outside any _target_); remove it"),
        (
            "train",
            ["+param_groups.bias_lr=3"],
            "+param_groups.bias_lr=3: nothing reads param_groups.bias_lr (a new key outside any _target_); "
            "did you mean param_groups.bias_lr_mult?",
        ),
        ("train", ["+debug=fdr"], "+debug=fdr: debug already has a choice; drop the + (debug=fdr)"),
        (
            "train",
            ["-m", "block=base,foo"],
            "block=base,foo: no such choice 'foo' in conf/block; choose one of: acb, base",
        ),
        ("train", ["block=base,acb"], "block=base,acb is a sweep: add -m (--multirun)"),
        ("train", ["optimizer.lr=interval(0.05,0.2)"], "optimizer.lr=interval(0.05,0.2) is a sweep: add -m"),
        (
            "train",
            ["experiment=quickstart", "+seed=1"],
            "+seed=1: seed is already in the config; drop the + (seed=1)",
        ),
        (
            "train",
            ["+model=resnet56"],
            "+model=resnet56: model already has a choice; drop the + (model=resnet56)",
        ),
        (
            "train",
            ["data.batch_size"],
            "cannot read the override 'data.batch_size': missing EQUAL at '<EOF>'",
        ),
        ("train", ["-cn", "deploy", "verify.nope=2"], "verify.nope=2: no such key in the config"),
        # renamed keys: the old command line names the new key
        (
            "train",
            ["block=custom", "block.block=mypkg.blocks:MyBlock"],
            "block.block=mypkg.blocks:MyBlock: no such key in the config; "
            "did you mean block.name=mypkg.blocks:MyBlock? (block.block was renamed)",
        ),
        (
            "train",
            ["block=base", "acb_gamma_init=0.5"],
            "acb_gamma_init=0.5: no such key in the config; did you mean block.gamma_init=0.5?",
        ),
        (
            "train",
            ["-m", "acb_bare_convs=true,all"],
            "acb_bare_convs=true,all: no such key in the config; did you mean block.bare_convs=true,all?",
        ),
        (
            "deploy",
            ["verify.max_rel_error=1e-4"],
            "verify.max_rel_error=1e-4: no such key in the config; did you mean verify.logit_rtol=1e-4?",
        ),
        ("train", ["+model.depth=20"], "+model.depth=20: nothing reads model.depth"),
        ("train", ["-m", "--cfg", "job", "seed=0,1"], "--multirun and --cfg do not go together"),
    ],
)
def test_config_mistakes_are_one_line_with_the_fix(config: str, argv: list[str], expected: str) -> None:
    with pytest.raises(ValueError) as error:
        check_overrides(config, CONF_DIR, argv)
    message = str(error.value)
    assert message.startswith(expected) and "\n" not in message, message
    assert "Config search path" not in message


def test_ddp_child_ranks_and_full_error_skip_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child rank re-runs a job rank zero already checked; HYDRA_FULL_ERROR=1 asks for Hydra's own message."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert check_overrides("train", CONF_DIR, ["model=foo"]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert check_overrides("train", CONF_DIR, ["model=foo"]) is None
