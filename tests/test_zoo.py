"""torchvision and timm models by name, pretrained weights from a file or the local cache, and ACB/DBB
conversions that start at exactly the pretrained model's function (block.preserve)."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
import torchvision
from conftest import CONF_DIR, TINY_RUN, isolated_env, run_train

from acnet_pl.models import build_model, list_models
from acnet_pl.models.registry import _library_spec, check_input_size, default_input_size


def _same_state_dict_layout(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_torchvision_model_by_name_is_the_library_model(name: str) -> None:
    model = build_model(name, num_classes=7, library="torchvision")
    _same_state_dict_layout(model, torchvision.models.get_model(name, num_classes=7))
    assert f"torchvision:{name}" in list_models("torchvision")
    assert len(list_models("torchvision")) == len(torchvision.models.list_models(module=torchvision.models))
    assert default_input_size(f"torchvision:{name}") == (3, 224, 224)  # its weights' crop size


def test_timm_model_by_name_is_the_library_model() -> None:
    model = build_model("timm:efficientnet_b0", num_classes=7)
    _same_state_dict_layout(model, timm.create_model("efficientnet_b0", num_classes=7))
    assert len(list_models("timm")) == len(timm.list_models())
    assert default_input_size("timm:inception_v3") == (3, 299, 299)  # timm's pretrained_cfg


def test_unknown_names_suggest_the_library_own_names() -> None:
    with pytest.raises(
        ValueError, match=r"^unknown torchvision model 'mobilenetv2'; did you mean mobilenet_v2"
    ):
        build_model("mobilenetv2", library="torchvision")
    with pytest.raises(
        ValueError, match=r"^unknown timm model 'efficientnetb0'; did you mean efficientnet_b0"
    ):
        build_model("timm:efficientnetb0")
    with pytest.raises(ValueError, match="unknown model library 'keras'"):
        build_model("resnet", library="keras")
    with pytest.raises(ValueError) as info:
        build_model("ssd300_vgg16", library="torchvision")  # a detection model: not a classifier
    assert "\n" not in str(info.value)


def test_timm_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    _library_spec.cache_clear()
    with pytest.raises(
        ValueError, match=r"^timm models need timm, which is not installed: pip install timm$"
    ):
        build_model("timm:resnet10t")
    _library_spec.cache_clear()
    assert build_model("torchvision:resnet18", 3).fc.out_features == 3  # torchvision needs no timm


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_input_size_check_on_library_models(library: str) -> None:
    """timm's builders read tensors (drop-path rates): the meta-device check builds them on the CPU then."""
    check_input_size(f"{library}:efficientnet_b0", (3, 8, 8))  # stride-2 convs with padding take 1 px
    with pytest.raises(
        ValueError, match=rf"^images of 8x8 are too small for {library}:vgg11: it needs at least 32x32"
    ):
        check_input_size(f"{library}:vgg11", (3, 8, 8))  # five max-pools: 32 px at least


# -- pretrained weights: a file or the local cache, never a download ----------------------------------


def _equal_except(model: torch.nn.Module, reference: dict[str, torch.Tensor], skip: set[str]) -> None:
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in reference.items() if k not in skip)


def test_weights_file_with_another_head_replaces_it_in_one_line(tmp_path, caplog) -> None:
    trained = torchvision.models.get_model("mobilenet_v3_small", num_classes=1000).state_dict()
    torch.save(trained, tmp_path / "imagenet.pth")
    with caplog.at_level("INFO", logger="acnet_pl.models.weights"):
        model = build_model("torchvision:mobilenet_v3_small", 10, weights=str(tmp_path / "imagenet.pth"))
    head = {"classifier.3.weight", "classifier.3.bias"}
    _equal_except(model, trained, head)
    assert model.classifier[3].out_features == 10
    [line] = [r.getMessage() for r in caplog.records]
    assert "classifier head classifier.3.weight, classifier.3.bias has 1000 classes there, 10 here" in line


@pytest.mark.slow
def test_timm_checkpoint_safetensors_and_base_checkpoint_load_exactly(tmp_path) -> None:
    import argparse

    from safetensors.torch import save_file

    trained = timm.create_model("resnet10t", num_classes=5).state_dict()
    # timm's train.py: the weights under "state_dict", with its argparse.Namespace
    torch.save(
        {"epoch": 3, "state_dict": trained, "args": argparse.Namespace(lr=0.1)}, tmp_path / "timm.pth.tar"
    )
    save_file(trained, tmp_path / "model.safetensors")
    # a train.py checkpoint of the base model: the weights under "state_dict" as "model.<key>"
    lightning = {
        "hyper_parameters": {"block": {"name": "base"}},
        "state_dict": {f"model.{k}": v for k, v in trained.items()},
    }
    torch.save(lightning, tmp_path / "base.ckpt")
    for name in ("timm.pth.tar", "model.safetensors", "base.ckpt"):
        _equal_except(build_model("timm:resnet10t", 5, weights=str(tmp_path / name)), trained, set())
    lightning["hyper_parameters"]["block"]["name"] = "acb"
    torch.save(lightning, tmp_path / "acb.ckpt")
    with pytest.raises(
        ValueError, match=r"a checkpoint of a block=acb model; .* give model.weights=<run>/deploy/deploy.pt$"
    ):
        build_model("timm:resnet10t", 5, weights=str(tmp_path / "acb.ckpt"))


def test_weights_that_do_not_fit_are_one_line_naming_the_keys(tmp_path) -> None:
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ValueError) as info:
        build_model("torchvision:resnet34", 4, weights=str(tmp_path / "r18.pt"))
    message = str(info.value)
    assert (
        "\n" not in message
        and "weights do not fit torchvision:resnet34: missing layer1.2.conv1.weight" in message
    )
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"missing .* \(\+\d+ more\); unexpected weight$"):
        build_model("resnet20", 10, weights=str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match=r"nope.pt: no such file"):
        build_model("resnet20", 10, weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match=r"model.init=kaiming starts a model from scratch"):
        build_model("resnet20", 10, init="kaiming", weights=str(tmp_path / "r18.pt"))


def test_pretrained_reads_the_torchvision_cache_only(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(
        FileNotFoundError,
        match=r"^no pretrained weights of torchvision:mobilenet_v3_small in the local cache .*nothing is downloaded",
    ):
        build_model("mobilenet_v3_small", 10, library="torchvision", pretrained=True)
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    trained = torchvision.models.get_model("mobilenet_v3_small").state_dict()
    torch.save(trained, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    model = build_model("mobilenet_v3_small", 10, library="torchvision", pretrained=True)
    _equal_except(model, trained, {"classifier.3.weight", "classifier.3.bias"})


def test_pretrained_reads_the_hugging_face_cache_only(tmp_path, monkeypatch) -> None:
    import huggingface_hub
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(
        FileNotFoundError, match=r"looked for timm/resnet10t.c3_in1k in .*; nothing is downloaded"
    ):
        build_model("timm:resnet10t", 3, pretrained=True)
    repo = tmp_path / "models--timm--resnet10t.c3_in1k"  # the hub cache's layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    trained = timm.create_model("resnet10t").state_dict()
    save_file(trained, repo / "snapshots" / "abc123" / "model.safetensors")
    _equal_except(build_model("timm:resnet10t", 3, pretrained=True), trained, {"fc.weight", "fc.bias"})


# -- block.preserve: the converted model starts at exactly the trained function -----------------------


def _trained_like(model: torch.nn.Module, size: int = 32) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, as a trained model has."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    for _ in range(2):
        model(torch.randn(8, 3, size, size))
    return model.eval()


PRESERVED = [
    ("resnet20", "acb", {}),
    ("resnet20", "dbb", {}),
    pytest.param("torchvision:resnet18", "acb", {"impl": "stacked"}, marks=pytest.mark.slow),
    # depthwise convs: DBB without its 1x1 branch; dropout in the head
    pytest.param("torchvision:mobilenet_v3_small", "dbb", {}, marks=pytest.mark.slow),
    pytest.param("timm:efficientnet_b0", "acb", {}, marks=pytest.mark.slow),  # timm's BatchNormAct2d
]


@pytest.mark.parametrize(("name", "block", "options"), PRESERVED)
def test_preserve_starts_at_the_trained_function(tmp_path, name: str, block: str, options: dict) -> None:
    base = _trained_like(build_model(name, 4))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    weights = str(tmp_path / "base.pt")
    # gamma_init (an experiment's recipe) does not touch a preserved block
    model = build_model(name, 4, block, weights=weights, preserve=True, gamma_init=0.333, **options).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        expected, got = base(x), model(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # the first train-mode step: the same batch statistics, the same loss; the new branches learn
    base.train(), model.train()
    losses = []
    for net in (base, model):
        torch.manual_seed(1)  # the same dropout masks
        losses.append(torch.nn.functional.cross_entropy(net(x), y))
    expected, loss = losses
    assert abs(loss.item() - expected.item()) <= 1e-5 * loss.item()
    loss.backward()
    silent = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.abs().sum()]
    assert silent and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in silent)
    # float64: the same function up to float64 rounding
    base64 = build_model(name, 4, weights=weights).double().eval()
    model64 = build_model(name, 4, block, weights=weights, preserve=True, **options).double().eval()
    with torch.no_grad():
        expected = base64(x.double())
        assert (model64(x.double()) - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_preserve_refuses_what_it_cannot_keep_in_one_line() -> None:
    with pytest.raises(
        ValueError, match=r"^block.preserve=true keeps a trained conv -> BN exactly; .*bare_convs=false$"
    ):
        build_model("densenet40", 10, "acb", preserve=True, bare_convs="all")
    with pytest.raises(
        ValueError, match=r"^block.preserve=true needs a BN with gamma on every new branch of ACBlock"
    ):
        build_model("resnet20", 10, "acb", preserve=True, branch_bn=False)


# -- slow: train.py end to end on digits, as a user runs it ---------------------------------------------

ZOO_RUN = [
    "data=digits",
    "data.image_size=16",
    "data.batch_size=32",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=3",
    "++trainer.enable_progress_bar=false",
    "~callbacks.rich_progress_bar",
    "~callbacks.diagnostics",  # its figures cost minutes on these models; tests/test_diagnostics.py runs it
    "logger=csv",
    "hydra.run.dir=run",
]


def _train(args: list[str], tmp_path) -> str:
    # one thread: on a shared 2-core machine, OpenMP threads that wait for each other cost 10x here
    env = isolated_env(tmp_path / "home", OMP_NUM_THREADS="1")
    proc = run_train([*ZOO_RUN, *args], tmp_path, env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _digits_top1(model: torch.nn.Module) -> float:
    from acnet_pl.data import DigitsDataModule

    data = DigitsDataModule(image_size=16, batch_size=120, num_workers=0)
    data.setup("validate")
    with torch.no_grad():
        pairs = [(model.eval()(x).argmax(1) == y) for x, y in data.val_dataloader()]
    return torch.cat(pairs).float().mean().item()


@pytest.mark.slow
def test_torchvision_model_fine_tunes_with_acb_and_deploys_into_the_library_model(tmp_path) -> None:
    from acnet_pl.deploy.checkpoint import load_source

    weights = tmp_path / "imagenet.pth"  # "pretrained" weights with a 1000-class head
    torch.save(_trained_like(torchvision.models.get_model("mobilenet_v3_small")).state_dict(), weights)
    args = ["model=torchvision", "model.name=mobilenet_v3_small", "block=acb", "block.preserve=true"]
    output = _train([*args, f"model.weights={weights}"], tmp_path)
    assert "has 1000 classes there, 10 here: replaced by a new head" in output
    assert "model=torchvision:mobilenet_v3_small block=acb" in output  # the run's start line
    record = torch.load(tmp_path / "run" / "deploy" / "deploy.pt", weights_only=True)
    assert record["model"] == {"name": "torchvision:mobilenet_v3_small", "num_classes": 10}
    assert record["pretrained_from"] == str(weights)
    untouched = torchvision.models.get_model("mobilenet_v3_small", num_classes=10)
    untouched.load_state_dict(record["state_dict"], strict=True)
    # deploy.py, evaluate and analyze rebuild it from the record (and from the checkpoint)
    assert (
        load_source(tmp_path / "run" / "deploy" / "deploy.pt").model_name == "torchvision:mobilenet_v3_small"
    )
    assert type(load_source(tmp_path / "run" / "checkpoints" / "last.ckpt").model).__name__ == "MobileNetV3"


@pytest.mark.slow
def test_timm_base_model_deploys_and_acb_from_it_starts_at_its_accuracy(tmp_path) -> None:
    _train(["model=timm", "model.name=resnet10t", "block=base"], tmp_path)
    deploy = tmp_path / "run" / "deploy" / "deploy.pt"
    record = torch.load(deploy, weights_only=True)
    untouched = timm.create_model("resnet10t", num_classes=10)
    untouched.load_state_dict(record["state_dict"], strict=True)
    base_top1 = _digits_top1(untouched)
    acb = build_model("timm:resnet10t", 10, "acb", weights=str(deploy), preserve=True)
    assert _digits_top1(acb) == base_top1  # before its first step


# -- normalisation: that of the weights a run starts from ------------------------------------------------


def _compose(tmp_path, *overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    model = ["model=timm", "model.name=resnet10t", "block=base", "logger=none"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_RUN, *model, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def _normalization(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from hydra.utils import instantiate

    from acnet_pl.cli.train import choose_normalization

    choose_normalization(cfg)
    data = instantiate(cfg.data)
    return tuple(data.mean), tuple(data.std)


@pytest.mark.slow
def test_a_run_from_pretrained_weights_normalises_as_they_were_trained(tmp_path, wandb_free_env) -> None:
    from acnet_pl.cli.train import train
    from acnet_pl.deploy.record import make_deploy_record
    from acnet_pl.utils.loading import load_weights_only

    timm_cfg = timm.models.get_pretrained_cfg("resnet10t")
    library = (tuple(timm_cfg.mean), tuple(timm_cfg.std))
    fake = ((0.0,) * 3, (1.0,) * 3)  # the data set's own
    weights = tmp_path / "timm.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), weights)
    assert _normalization(_compose(tmp_path)) == fake  # from scratch
    assert _normalization(_compose(tmp_path, f"model.weights={weights}", "normalize=data")) == fake
    assert _normalization(_compose(tmp_path, "normalize=model")) == library
    # a deploy.pt (or train.py checkpoint) of this project: the normalisation it records
    state = timm.create_model("resnet10t", num_classes=4).state_dict()
    record = make_deploy_record(
        state, model_name="timm:resnet10t", num_classes=4, block={"name": "base"}, input_size=(3, 16, 16),
        mean=(0.5,) * 3, std=(0.25,) * 3,
    )  # fmt: skip
    torch.save(record, tmp_path / "own.pt")
    own = _compose(tmp_path, f"model.weights={tmp_path / 'own.pt'}")
    assert _normalization(own) == ((0.5,) * 3, (0.25,) * 3)

    cfg = _compose(tmp_path, f"model.weights={weights}")
    train(cfg)  # the checkpoint and deploy.pt record the library's normalisation the run used
    ckpt = load_weights_only(tmp_path / "run" / "checkpoints" / "last.ckpt")
    data = ckpt["hyper_parameters"]["data"]
    assert (tuple(data["mean"]), tuple(data["std"])) == library
    assert (
        tuple(data["datamodule"]["mean"]),
        tuple(data["datamodule"]["std"]),
    ) == library  # deploy's val data
    deployed = torch.load(tmp_path / "run" / "deploy" / "deploy.pt", weights_only=True)
    assert (tuple(deployed["mean"]), tuple(deployed["std"])) == library
