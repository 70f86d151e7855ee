"""acnet_pl.launch: the Lightning/Hydra internals its workarounds rely on are still there, as pinned.

Each test names what changed and what to re-check when it fails. They take about two seconds (no
training); the behaviour itself (DDP through train.py, DDP in a multirun, override messages, stop
signals) is tested in tests/test_train_cli.py, tests/test_overrides.py and tests/test_preemption.py.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import re
import textwrap
from importlib.metadata import version

import lightning as L
import pytest
from conftest import CONF_DIR, REPO_ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from acnet_pl.launch import ddp, overrides
from acnet_pl.launch.wandb_logger import drop_anonymous_argument

#: The minor versions whose internals acnet_pl/launch was checked against (pyproject.toml pins these).
TESTED_MINORS = {"lightning": "2.6", "hydra-core": "1.3"}

RECHECK = (
    "re-check every module of acnet_pl/launch against the new version (each docstring lists what it "
    "relies on), run tests/test_launch.py, tests/test_preemption.py and the DDP/multirun tests of "
    "tests/test_train_cli.py, then update TESTED_MINORS here and the pins in pyproject.toml"
)


def _pyproject_specifier(package: str) -> SpecifierSet:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    found = re.search(rf'^\s*"{re.escape(package)}([<>=!~][^";]*)"', text, flags=re.MULTILINE)
    assert found, f"pyproject.toml has no pinned requirement for {package}"
    return SpecifierSet(found.group(1))


@pytest.mark.parametrize("package", sorted(TESTED_MINORS))
def test_installed_versions_are_the_pinned_minors(package: str) -> None:
    """pyproject.toml allows exactly the tested minor version, and that is the one installed."""
    tested = Version(TESTED_MINORS[package] + ".0")
    major, minor = tested.release[:2]
    spec = _pyproject_specifier(package)
    assert spec.contains(f"{major}.{minor}.0") and spec.contains(f"{major}.{minor}.99"), (
        f"pyproject.toml pins {package}{spec}, which excludes the tested {major}.{minor}: {RECHECK}"
    )
    assert not spec.contains(f"{major}.{minor + 1}.0") and not spec.contains(f"{major}.{minor - 1}.99"), (
        f"pyproject.toml pins {package}{spec}, wider than the tested {major}.{minor}.x: {RECHECK}"
    )
    installed = Version(version(package))
    assert installed.release[:2] == (major, minor), (
        f"{package} {installed} is installed, acnet_pl/launch was checked against {major}.{minor}: {RECHECK}"
    )


# --------------------------------------------------------------------------------------------------
# DDP inside Hydra (acnet_pl/launch/ddp.py): Lightning's private _SubprocessScriptLauncher


def _normalised_source(fn: object) -> str:
    """The code of `fn` without comments and layout (ast round trip), so only a change of code counts."""
    return ast.unparse(ast.parse(textwrap.dedent(inspect.getsource(fn))))


#: sha256 (first 16 hex digits) of the normalised code of the Lightning 2.6 methods ddp.py depends on.
LAUNCHER_CODE = {
    # HydraJobLauncher._call_children_scripts is a copy of this one with another command line.
    "_call_children_scripts": "e408629f6104900a",
    # calls _call_children_scripts, then sets the thread count HydraJobLauncher.cleanup restores
    "launch": "fb0627f77fb34d60",
    "_check_can_spawn_children": "ef9998f010612d78",
}


@pytest.mark.parametrize("method", sorted(LAUNCHER_CODE))
def test_lightning_launcher_code_is_the_one_mirrored(method: str) -> None:
    code = _normalised_source(getattr(_SubprocessScriptLauncher, method))
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    assert digest == LAUNCHER_CODE[method], (
        f"Lightning's _SubprocessScriptLauncher.{method} changed (lightning {L.__version__}): compare it "
        f"with HydraJobLauncher in acnet_pl/launch/ddp.py, bring ours in line, then set "
        f"LAUNCHER_CODE[{method!r}] = {digest!r} in tests/test_launch.py. Its code now:\n{code}"
    )


def test_lightning_launcher_constructor_and_attributes() -> None:
    """HydraJobLauncher calls the parent's __init__ with these arguments and reads these attributes."""
    params = list(inspect.signature(_SubprocessScriptLauncher.__init__).parameters)
    assert params == ["self", "cluster_environment", "num_processes", "num_nodes"], (
        f"_SubprocessScriptLauncher.__init__{params} changed: update HydraJobLauncher.__init__ "
        "in acnet_pl/launch/ddp.py"
    )
    for name in ("_call_children_scripts", "_check_can_spawn_children", "launch", "kill"):
        assert callable(getattr(_SubprocessScriptLauncher, name, None)), (
            f"_SubprocessScriptLauncher.{name} is gone: re-check HydraJobLauncher in acnet_pl/launch/ddp.py"
        )


def test_lightning_fit_starts_processes_with_strategy_launcher() -> None:
    """fit calls `trainer.strategy.launcher.launch(...)`, read when fit starts: a swapped launcher is used."""
    from lightning.pytorch.trainer import call

    code = _normalised_source(call._call_and_handle_interrupt)
    assert "trainer.strategy.launcher.launch(" in code, (
        "Lightning's trainer/call.py no longer starts processes with trainer.strategy.launcher.launch: "
        f"re-check use_hydra_job_launcher in acnet_pl/launch/ddp.py. Its code now:\n{code}"
    )


@pytest.fixture
def ddp_trainer(monkeypatch: pytest.MonkeyPatch) -> L.Trainer:
    """A 2-process CPU DDP trainer, as train.py builds it in the launching process (nothing started)."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    return L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture
def hydra_job(request: pytest.FixtureRequest):
    """HydraConfig of a composed train config with `request.param` overrides, as inside a Hydra job."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(request.param), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        yield HydraConfig.get()
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("hydra_job", [[]], indirect=True)
def test_ddp_launcher_is_swapped_in_a_hydra_job(ddp_trainer: L.Trainer, hydra_job) -> None:
    launcher = ddp_trainer.strategy._launcher
    assert type(launcher) is _SubprocessScriptLauncher, (
        f"Trainer(strategy='ddp', devices=2).strategy._launcher is {type(launcher).__name__}: Lightning "
        "changed where or how DDP starts processes; re-check acnet_pl/launch/ddp.py"
    )
    assert (launcher.num_processes, launcher.num_nodes, launcher.procs) == (2, 1, [])
    assert not launcher.cluster_environment.creates_processes_externally
    assert hydra_job.launcher._target_ == ddp.BASIC_LAUNCHER, (
        f"Hydra's default launcher is {hydra_job.launcher._target_}, not ddp.BASIC_LAUNCHER: update it"
    )
    swapped = ddp.use_hydra_job_launcher(ddp_trainer)
    assert isinstance(swapped, ddp.HydraJobLauncher)
    assert ddp_trainer.strategy.launcher is swapped, (
        "strategy.launcher does not return strategy._launcher: re-check use_hydra_job_launcher"
    )
    assert (swapped.num_processes, swapped.num_nodes, swapped.procs) == (2, 1, [])
    assert swapped.cluster_environment is launcher.cluster_environment


@pytest.mark.parametrize(
    "hydra_job", [["hydra.mode=MULTIRUN", "hydra/launcher=submitit_local"]], indirect=True
)
def test_ddp_under_a_launcher_that_cannot_start_ranks_is_one_line(ddp_trainer: L.Trainer, hydra_job) -> None:
    with pytest.raises(
        ValueError, match=r"^trainer.devices=2 \(DDP\) cannot .* hydra/launcher=submitit_local;"
    ):
        ddp.use_hydra_job_launcher(ddp_trainer)


def test_no_swap_outside_hydra(ddp_trainer: L.Trainer) -> None:
    launcher = ddp_trainer.strategy._launcher
    assert ddp.use_hydra_job_launcher(ddp_trainer) is None
    assert ddp_trainer.strategy.launcher is launcher


def test_config_flags_keep_only_config_location() -> None:
    argv = ["-m", "--config-name", "other", "block=base,acb", "-cp=conf2", "seed=1", "-cd", "/x"]
    assert ddp._config_flags(argv) == ["--config-name", "other", "-cp=conf2", "-cd", "/x"]


def test_hydra_job_config_has_what_rank_commands_read() -> None:
    """hydra_rank_command and use_hydra_job_launcher read (or override) these fields of Hydra's schema."""
    import dataclasses

    from hydra import conf

    read = {
        conf.HydraConf: {
            "mode",
            "run",
            "sweep",
            "sweeper",
            "launcher",
            "job",
            "runtime",
            "overrides",
            "output_subdir",
        },
        conf.OverridesConf: {"task", "hydra"},
        conf.RuntimeConf: {"output_dir", "choices"},
        conf.JobConf: {"name"},
    }
    for schema, fields in read.items():
        missing = fields - {f.name for f in dataclasses.fields(schema)}
        assert not missing, (
            f"Hydra's {schema.__name__} lost {sorted(missing)}: re-check acnet_pl/launch/ddp.py"
        )


# --------------------------------------------------------------------------------------------------
# Stop signals (acnet_pl/launch/stop_signals.py): Lightning's private _SignalConnector


def test_lightning_signal_connector_is_the_one_replaced() -> None:
    """AgreedStopSignals replaces trainer._signal_connector; it relies on these parts of _SignalConnector."""
    from lightning.pytorch.trainer import trainer as trainer_module
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    from acnet_pl.launch.stop_signals import AgreedStopSignals, agree_on_stop_signals

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert type(trainer._signal_connector) is _SignalConnector, (
        "Trainer._signal_connector is gone or another class: re-check acnet_pl/launch/stop_signals.py"
    )
    for name in ("_get_current_signal_handlers", "_register_signal", "_slurm_sigusr_handler_fn", "teardown"):
        assert callable(getattr(_SignalConnector, name, None)), (
            f"_SignalConnector.{name} is gone: re-check AgreedStopSignals in acnet_pl/launch/stop_signals.py"
        )
    run = _normalised_source(trainer_module.Trainer._run)
    teardown = _normalised_source(trainer_module.Trainer._teardown)
    assert "self._signal_connector.register_signal_handlers()" in run, (
        "Trainer._run no longer installs the handlers through _signal_connector: re-check stop_signals.py"
    )
    assert "self._signal_connector.teardown()" in teardown
    signals = agree_on_stop_signals(trainer)
    assert isinstance(signals, AgreedStopSignals) and trainer._signal_connector is signals
    signals.received_sigterm = True
    assert trainer.received_sigterm, "Trainer.received_sigterm no longer reads the connector's attribute"
    assert hasattr(trainer._accelerator_connector, "cluster_environment")


# --------------------------------------------------------------------------------------------------
# Override pre-check (acnet_pl/launch/overrides.py): Hydra's private argument parser, its error texts


def test_hydra_args_parser_reads_the_command_line_as_hydra_main() -> None:
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    dests = {action.dest for action in parser._actions}
    wanted = {"overrides", "multirun", "run", "cfg", "info", "shell_completion", "config_name"}
    wanted |= set(overrides.LEFT_TO_HYDRA)
    assert wanted <= dests, (
        f"hydra._internal.utils.get_args_parser() lost {sorted(wanted - dests)}: re-check "
        "parse_argv in acnet_pl/launch/overrides.py"
    )
    args = parser.parse_args(["-m", "--config-name", "other", "seed=1", "block=base,acb"])
    assert (args.multirun, args.config_name, args.overrides) == (True, "other", ["seed=1", "block=base,acb"])
    assert overrides.parse_argv(["-m", "seed=1"]).overrides == ["seed=1"]
    assert overrides.parse_argv(["--info", "seed=1"]) is None


@pytest.mark.parametrize(
    ("override", "pattern", "key"),
    [
        ("trainer.max_epochz=1", overrides.FAILED, "trainer.max_epochz"),
        ("+seed=1", overrides.ALREADY, "seed"),
        ("+model=resnet20", overrides.ALREADY, "model"),
    ],
)
def test_hydra_composition_errors_name_the_key(override: str, pattern: str, key: str) -> None:
    from hydra.errors import HydraException

    conf = initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
    with conf, pytest.raises(HydraException) as error:
        compose("train", overrides=[override], return_hydra_config=True)
    found = re.search(pattern, str(error.value))
    assert found and key in found.groups(), (
        f"Hydra's message for {override} changed to {str(error.value)!r}: update the pattern {pattern!r} "
        "in acnet_pl/launch/overrides.py (tests/test_overrides.py shows what the user must see)"
    )


def test_hydra_missing_choice_error_lists_the_options() -> None:
    from hydra.errors import MissingConfigException

    conf = initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
    with conf, pytest.raises(MissingConfigException) as error:
        compose("train", overrides=["model=foo"])
    assert error.value.missing_cfg_file == "model/foo" and "resnet20" in (error.value.options or []), (
        "Hydra's MissingConfigException lost missing_cfg_file/options: re-check _message in "
        "acnet_pl/launch/overrides.py"
    )


# --------------------------------------------------------------------------------------------------
# W&B (acnet_pl/launch/wandb_logger.py): Lightning's private WandbLogger._wandb_init


def test_lightning_wandb_logger_still_passes_anonymous() -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="p", offline=True)
    assert isinstance(getattr(logger, "_wandb_init", None), dict), (
        "WandbLogger._wandb_init is gone: re-check acnet_pl/launch/wandb_logger.py"
    )
    assert "anonymous" in logger._wandb_init, (
        "Lightning no longer passes `anonymous` to wandb.init: drop acnet_pl/launch/wandb_logger.py"
    )
    drop_anonymous_argument([logger])
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "p"


# --------------------------------------------------------------------------------------------------
# Model summary (acnet_pl/launch/model_summary.py): Lightning's private _summary hook, _max_depth


def test_network_summary_has_flops_and_no_metric_rows() -> None:
    """Lightning's summary of the network only, with the FLOPs of one image (Lightning internals pinned)."""
    import torch
    from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary

    from acnet_pl.launch.model_summary import ModelSummary, NetworkSummary
    from acnet_pl.models import build_model
    from acnet_pl.training.module import ACNetModule

    assert callable(getattr(LightningModelSummary, "_summary", None)), (
        "Lightning's ModelSummary lost its _summary hook: re-check acnet_pl/launch/model_summary.py"
    )
    module = ACNetModule(
        model={"name": "cifar_quick", "num_classes": 4},
        block={"name": "base"},
        data={"input_size": [3, 16, 16]},
    )
    summary = ModelSummary(max_depth=2)._summary(None, module)  # type: ignore[arg-type]
    assert isinstance(summary, NetworkSummary) and ModelSummary(max_depth=3)._max_depth == 3
    assert module.example_input_array is None  # set for the summary only
    assert "MulticlassAccuracy" not in summary.layer_types and "MeanMetric" not in summary.layer_types
    assert summary.layer_names[:2] == ["model", "model.features"]
    # cifar_quick on one 3x16x16 image, counted by torch's FlopCounterMode on a plain copy of the network
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        build_model("cifar_quick", num_classes=4).eval()(torch.zeros(1, 3, 16, 16))
    assert summary.total_flops == counter.get_total_flops() > 4e6


def test_summary_under_compile_runs_the_eager_network() -> None:
    """compile=true: the summary's batch-1 forward does not go through the compiled network (it would compile
    it for batch 1 in eval mode, then training recompiles); the compiled one is back afterwards."""
    from acnet_pl.launch.model_summary import ModelSummary
    from acnet_pl.training.module import ACNetModule

    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, data={"input_size": [3, 16, 16]})

    def compiled(x):
        raise AssertionError("the summary ran the compiled network")

    object.__setattr__(module, "_compiled", compiled)
    assert ModelSummary()._summary(None, module).total_flops > 4e6  # type: ignore[arg-type]
    assert module._compiled is compiled
