"""acnet_pl.analysis: kernel magnitude maps, skeleton share, branch gammas, robustness, pruning.

Maps are compared in float64 (tolerance 1e-12 for hand-made kernels, 1e-6 where one side went through a
float32 deploy file); accuracies are exact fractions of a hand-built data set.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch import nn

from acnet_pl.analysis import (
    PRUNE_REGIONS,
    average_maps,
    branch_gamma_stats,
    cached_batches,
    evaluate_top1,
    gamma_branches,
    kernel_maps,
    magnitude_map,
    mean_branch_gammas,
    prune_mask,
    pruned_model,
    pruning,
    robustness,
    skeleton_mask,
    skeleton_share,
    summarize_kernels,
    top1_tables,
)
from acnet_pl.cli.analyze import default_output_dir, format_analysis_tables
from acnet_pl.deploy.record import load_deployed, make_deploy_record
from acnet_pl.models import build_model
from acnet_pl.reparam import fuse

# Many tiny convs: one thread is the fastest on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every BN (trained-looking, not identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# kernel maps


def test_magnitude_map_of_a_hand_made_kernel_is_exact():
    # Two output channels, one input channel; |w| summed per position is 1..9, so the map is (1..9) / 9.
    w = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    w[0, 0] = torch.tensor([[1.0, -2.0, 3.0], [0.0, 5.0, 0.0], [-7.0, 0.0, 9.0]])
    w[1, 0] = torch.tensor([[0.0, 0.0, 0.0], [-4.0, 0.0, 6.0], [0.0, 8.0, 0.0]])
    expected = torch.arange(1.0, 10.0, dtype=torch.float64).view(3, 3) / 9.0
    assert torch.allclose(magnitude_map(w), expected, rtol=0, atol=1e-15)
    # skeleton = centre row (4, 5, 6) and centre column (2, 5, 8), the centre once: 25 of 45
    assert skeleton_share(magnitude_map(w)) == pytest.approx(25 / 45, abs=1e-15)
    assert skeleton_mask(3).tolist() == [[False, True, False], [True, True, True], [False, True, False]]
    assert magnitude_map(torch.zeros(1, 1, 3, 3)).abs().sum() == 0


def test_average_map_is_the_mean_per_kernel_size():
    a, b = torch.ones(3, 3), torch.zeros(3, 3)
    b[1, 1] = 1.0
    c = torch.ones(5, 5)
    avg = average_maps({"a": a, "b": b, "c": c})
    assert sorted(avg) == [3, 5]
    assert torch.equal(avg[3], (a + b) / 2) and torch.equal(avg[5], c)
    assert skeleton_share(avg[5]) == pytest.approx(9 / 25, abs=1e-15)


def test_skeleton_only_model_has_share_one():
    model = randomize_bns(build_model("resnet20", num_classes=10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                m.weight[..., ~skeleton_mask(3)] = 0.0
    maps = kernel_maps(model)
    assert len(maps) == 19  # the stem and 2 x 9 block convs; 1x1 shortcuts are not KxK kernels
    assert all(skeleton_share(m) == pytest.approx(1.0, abs=1e-15) for m in maps.values())
    summary = summarize_kernels(model)
    assert summary["average"]["3"]["layers"] == 19
    assert summary["average"]["3"]["skeleton_share"] == pytest.approx(1.0, abs=1e-15)


def test_base_map_folds_the_bn_scale_into_the_kernel():
    # One conv + BN: the map is the one of W * gamma / sqrt(var + eps) per output channel.
    conv, bn = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
    model = randomize_bns(nn.Sequential(conv, bn), seed=3)
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    expected = magnitude_map(conv.weight.double() * scale.view(-1, 1, 1, 1))
    assert torch.allclose(kernel_maps(model)["0"], expected, rtol=0, atol=1e-12)


def test_deploy_file_map_equals_the_trained_acb_equivalent_kernels(tmp_path):
    acb = randomize_bns(build_model("cifar_quick", num_classes=4, block="acb"), seed=1)
    deployed = fuse(acb).eval()
    record = make_deploy_record(
        deployed.state_dict(),
        model_name="cifar_quick",
        num_classes=4,
        block={"name": "acb"},
        input_size=[3, 32, 32],
        mean=[0.0] * 3,
        std=[1.0] * 3,
    )
    torch.save(record, tmp_path / "deploy.pt")
    from_file = kernel_maps(load_deployed(tmp_path / "deploy.pt"))
    # The reference: each block's own equivalent kernel (float64), not the fuse path.
    blocks = {n: m for n, m in acb.named_modules() if type(m).__name__ == "ACBlock"}
    assert sorted(from_file) == sorted(blocks) == ["features.0", "features.4", "features.8"]
    for name, block in blocks.items():
        with torch.no_grad():
            kernel, _ = block.double_precision_copy().get_equivalent_kernel_bias()
        reference = magnitude_map(kernel)
        assert torch.allclose(from_file[name], reference, rtol=0, atol=1e-6), name
        assert not torch.allclose(reference, magnitude_map(block.square_conv.weight), atol=1e-3)
    # and the trained model in its training form gives the same maps as its deploy file
    for name, m in kernel_maps(acb).items():
        assert torch.allclose(m, from_file[name], rtol=0, atol=1e-6), name


def test_branch_gamma_stats_per_block():
    model = build_model("cifar_quick", num_classes=4, block="acb", gamma_init=1 / 3)
    block = model.features[4]
    with torch.no_grad():
        block.ver_bn.weight.copy_(torch.linspace(-1.0, 1.0, 32))  # mean |gamma| = 0.5161...
    stats = branch_gamma_stats(model)
    assert sorted(stats) == ["features.0", "features.4", "features.8"]
    assert stats["features.0"] == pytest.approx({"square": 1 / 3, "ver": 1 / 3, "hor": 1 / 3}, abs=1e-7)
    assert stats["features.4"]["ver"] == pytest.approx(
        torch.linspace(-1.0, 1.0, 32).abs().mean().item(), abs=1e-7
    )
    assert branch_gamma_stats(build_model("cifar_quick", num_classes=4)) == {}
    assert branch_gamma_stats(fuse(model)) == {}  # a fused block has no branches left


def test_branch_gamma_stats_are_the_blocks_branch_norms():
    """Block-neutral: each block names its branch BNs (ACB ablations, one BN after the sum, DBB)."""
    one_branch = build_model("cifar_quick", num_classes=4, block="acb", branches=["ver"], gamma_init=0.5)
    assert branch_gamma_stats(one_branch)["features.0"] == pytest.approx(
        {"square": 0.5, "ver": 0.5}, abs=1e-7
    )
    sum_bn = build_model("cifar_quick", num_classes=4, block="acb", branch_bn=False, gamma_init=0.25)
    assert branch_gamma_stats(sum_bn)["features.0"] == pytest.approx({"sum": 0.25}, abs=1e-7)
    dbb = build_model("cifar_quick", num_classes=4, block="dbb", gamma_init=0.25)
    stats = branch_gamma_stats(dbb)
    assert list(stats["features.0"]) == ["kxk", "1x1", "1x1_kxk", "avg"]
    assert stats["features.0"] == pytest.approx(
        dict.fromkeys(["kxk", "1x1", "1x1_kxk", "avg"], 0.25), abs=1e-7
    )
    with torch.no_grad():
        dbb.features[4].branch_norms()["avg"].weight.fill_(-1.0)
    means = mean_branch_gammas(branch_gamma_stats(dbb))
    assert means == pytest.approx({"kxk": 0.25, "1x1": 0.25, "1x1_kxk": 0.25, "avg": (0.25 + 1.0 + 0.25) / 3})
    assert gamma_branches(branch_gamma_stats(one_branch), stats) == [
        "square",
        "ver",
        "kxk",
        "1x1",
        "1x1_kxk",
        "avg",
    ]
    runs = [
        {"label": label, "kernels": {"average": {}, "layers": {}}, "branch_gamma": branch_gamma_stats(m)}
        for label, m in (("acb", one_branch), ("dbb", dbb))
    ]
    table = format_analysis_tables(runs).splitlines()
    assert table[-3:] == [
        "run   square      ver      kxk      1x1  1x1_kxk      avg",
        "acb    0.500    0.500        -        -        -        -",
        "dbb        -        -    0.250    0.250    0.250    0.500",
    ]


# --------------------------------------------------------------------------------------------------
# robustness


class LeftOrRight(nn.Module):
    """Class 0 when the left half of the image is brighter, class 1 when the right half is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean(dim=(1, 2, 3)), x[..., w:].mean(dim=(1, 2, 3))], dim=1)


def orientation_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A bright square in the top-left (label 0, 'left') or top-right (label 1, 'right') quadrant."""
    images, labels = torch.zeros(8, 1, 8, 8), torch.tensor([0, 1] * 4)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 1:3, (1 + 4 * label) : (3 + 4 * label)] = 1.0 + i  # varied brightness, same place
    return [(images[:4], labels[:4]), (images[4:], labels[4:])]


def test_robustness_on_an_orientation_labelled_set():
    top1 = robustness(LeftOrRight(), orientation_batches())
    # flip_lr swaps left and right: all wrong; flip_ud keeps them: all right. A quarter turn moves
    # one of the two corners to the other side and keeps the other: half right.
    assert top1 == {
        "original": 1.0,
        "flip_lr": 0.0,
        "flip_ud": 1.0,
        "rot90": 0.5,
        "rot180": 0.0,
        "rot270": 0.5,
    }
    # rot90 is counter-clockwise: the top-right corner goes to the top-left (class 1 read as 0).
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 6] = 1.0
    from acnet_pl.analysis import TRANSFORMS

    assert TRANSFORMS["rot90"](x)[0, 0, 1, 1] == 1.0


def test_robustness_of_an_empty_set_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        robustness(LeftOrRight(), [])


# --------------------------------------------------------------------------------------------------
# pruning


def test_prune_masks_split_the_kernel():
    for k in (3, 5):
        masks = [prune_mask(k, r) for r in ("corners", "skeleton", "centre")]
        assert torch.equal(masks[0] | masks[1] | masks[2], torch.ones(k, k, dtype=torch.bool))
        assert sum(int(m.sum()) for m in masks) == k * k
    assert int(prune_mask(5, "skeleton").sum()) == 8 and int(prune_mask(5, "corners").sum()) == 16
    with pytest.raises(ValueError, match="corners"):
        prune_mask(3, "edges")


def random_batches(n: int = 3, classes: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, classes, (8,), generator=g))
        for _ in range(n)
    ]


def labelled_by(model: nn.Module, batches: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches relabelled with ``model``'s own predictions: its top-1 is exactly 1."""
    with torch.no_grad():
        return [(x, model.eval()(x).argmax(dim=1)) for x, _ in batches]


def test_pruning_the_centre_of_a_1x1_model_changes_nothing():
    torch.manual_seed(0)
    model = randomize_bns(
        nn.Sequential(
            nn.Conv2d(3, 8, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
    )
    batches = labelled_by(model, random_batches())
    assert pruning(model, batches) == {"none": 1.0, "corners": 1.0, "skeleton": 1.0, "centre": 1.0}
    x = batches[0][0]
    with torch.no_grad():
        assert torch.allclose(pruned_model(model, "centre")(x), model(x), rtol=1e-5, atol=1e-5)


def test_pruning_corners_of_a_skeleton_only_model_changes_nothing():
    model = randomize_bns(build_model("cifar_quick", num_classes=4, block="acb"), seed=2)
    with torch.no_grad():  # an ACB model whose square kernels are zero: its kernels are skeletons
        for m in model.modules():
            if type(m).__name__ == "ACBlock":
                m.square_conv.weight.zero_()
    batches = labelled_by(model, random_batches())
    top1 = pruning(model, batches)
    assert top1["none"] == 1.0 and top1["corners"] == 1.0
    x = batches[0][0]
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(pruned_model(model, "corners")(x), y, rtol=1e-5, atol=1e-5)
        for region in ("skeleton", "centre"):  # the other two do change it
            assert (pruned_model(model, region)(x) - y).abs().max() > 1e-2, region


def test_pruning_fused_once_equals_each_region_pruned_apart():
    """pruning() fuses once and zeroes each region in turn, restoring the kernels between: the same top-1
    as a fresh pruned_model per region, and the model it is given unchanged."""
    torch.manual_seed(1)  # conv weights whose pruned top-1 differ by region
    model = randomize_bns(build_model("cifar_quick", num_classes=4, block="acb"), seed=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = labelled_by(model, random_batches())
    top1 = pruning(model, batches)
    expected = {
        str(r).lower(): evaluate_top1(pruned_model(model, r), batches) for r in (None, *PRUNE_REGIONS)
    }
    assert top1 == expected
    assert len(set(top1.values())) > 1  # the regions do differ on this model, so a leftover zero would show
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class CountingLoader:
    """An iterable of batches that counts how often it is read from the start."""

    def __init__(self, batches: list) -> None:
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_top1_tables_read_the_batches_once_and_equal_robustness_and_pruning_apart():
    torch.manual_seed(1)  # conv weights whose pruned top-1 differ by region
    model = randomize_bns(build_model("cifar_quick", num_classes=4, block="acb"), seed=3).eval()
    batches = labelled_by(model, random_batches(n=4))
    loader = CountingLoader(batches)
    tables = top1_tables(model, loader, limit_batches=3)
    assert loader.reads == 1  # ten evaluations, one read of the 3 bounded batches
    deployed = pruned_model(model, None)
    assert tables["robustness"] == robustness(deployed, batches[:3])
    assert tables["pruning"] == pruning(model, batches[:3])
    assert tables["pruning"]["none"] == tables["robustness"]["original"] == 1.0
    assert len(set(tables["pruning"].values())) > 1
    # fused=True: a deployed form is used as it is (not copied) and its kernels are restored after
    kernels = {k: v.clone() for k, v in deployed.state_dict().items()}
    assert top1_tables(deployed, batches, limit_batches=3, fused=True) == tables
    assert all(torch.equal(v, deployed.state_dict()[k]) for k, v in kernels.items())


def test_cached_batches_keep_what_fits_and_stream_the_rest(monkeypatch):
    batches = random_batches(n=3)  # each 8x3x16x16 float32 + 8 int64 labels = 24,640 bytes
    kept = cached_batches(batches, limit_batches=2)
    assert isinstance(kept, list) and len(kept) == 2
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kept, batches, strict=False)
    )
    module = importlib.import_module("acnet_pl.analysis.robustness")  # the package's name is the function
    monkeypatch.setattr(module, "CACHE_BYTES", 2 * 24_640 + 1)
    assert isinstance(cached_batches(batches, limit_batches=2), list)
    assert cached_batches(batches) is batches  # three would not fit: each pass reads the loader


def test_analysis_goes_into_the_run_dir_of_any_model_file() -> None:
    """checkpoints/x.ckpt, the fuse callback's deploy/deploy.pt and deploy.py's deploy/<name>/deploy.pt."""
    for given in ("r/checkpoints/last.ckpt", "r/deploy/deploy.pt", "r/deploy/last/deploy.pt"):
        assert default_output_dir([given]) == Path("r/analysis"), given
    assert default_output_dir(["elsewhere/model.pt"]) == Path("elsewhere/analysis")
