"""The networks, the pretrained weights and the checkpoints."""


import pytest
import torch
from torch import nn

from pipeline import files
from pipeline.errors import ArtifactError
from pipeline.frameworks import shapes
from pipeline.frameworks.torch import checkpoint, weights
from pipeline.frameworks.torch import model as torch_model


def test_scratch_cnn_maps_images_to_class_logits():
    model = torch_model.ScratchCNN(num_classes=10, in_channels=1, image_size=16)
    assert model(torch.rand(4, 1, 16, 16)).shape == (4, 10)


def test_scratch_cnn_without_the_third_block_or_batch_norm_still_builds():
    model = torch_model.ScratchCNN(num_classes=3, in_channels=3, image_size=24, conv3=False, batch_norm=False)
    assert model(torch.rand(2, 3, 24, 24)).shape == (2, 3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_model_can_overfit_one_batch():
    torch.manual_seed(0)
    model = torch_model.ScratchCNN(num_classes=4, in_channels=1, image_size=16, dropout=0.0)
    x, y = torch.rand(16, 1, 16, 16), torch.arange(16) % 4
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.05
    assert (model(x).argmax(1) == y).all()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    args = {"num_classes": 3, "in_channels": 1, "image_size": 16, "mean": (0.2,), "std": (0.3,)}
    model = torch_model.ScratchCNN(**args).eval()
    path = tmp_path / "scratch.pt"
    files.write_bytes(path, checkpoint.checkpoint_bytes(model, "scratch_cnn", args, ("a", "b", "c")))
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert set(raw) == {"arch", "model_args", "classes", "state_dict"}
    loaded, ckpt = checkpoint.load_checkpoint(path)
    x = torch.rand(5, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert ckpt["classes"] == ["a", "b", "c"]


def test_checkpoint_bytes_do_not_depend_on_the_file_name(tmp_path):
    torch.manual_seed(0)
    args = {"num_classes": 2, "in_channels": 1, "image_size": 16}
    model = torch_model.ScratchCNN(**args)
    files.write_bytes(tmp_path / "a.pt", checkpoint.checkpoint_bytes(model, "scratch_cnn", args, ("x", "y")))
    files.write_bytes(tmp_path / "other-name.pt", checkpoint.checkpoint_bytes(model, "scratch_cnn", args, ("x", "y")))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other-name.pt").read_bytes()


def test_a_checkpoint_holding_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"arch": "scratch_cnn", "model_args": {}, "classes": [], "state_dict": {}, "x": nn.ReLU()}, path)
    with pytest.raises(ArtifactError, match=r"evil.pt: refused: not a plain tensor checkpoint \(Unsupported global"):
        checkpoint.load_checkpoint(path)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    net, sha = weights.load_pretrained(weights.PACKAGE_BACKBONE, weights.PACKAGE_WEIGHTS, weights.PACKAGE_SHA256)
    assert sha == weights.PACKAGE_SHA256
    return net.eval()


def test_package_weights_are_really_imagenet_weights(lite0):
    # A cat photo must land in ImageNet's cat classes (281 tabby .. 285 Egyptian cat);
    # random or misaligned weights put it anywhere.
    from skimage import data as skdata

    image = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float().div(255)[None]
    image = nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    normalize = torch_model.Normalize(torch_model.IMAGENET_MEAN, torch_model.IMAGENET_STD)
    with torch.no_grad():
        top = lite0(normalize(image)).softmax(1)[0]
    assert 281 <= int(top.argmax()) <= 285
    assert float(top[281:286].sum()) > 0.5


def test_package_weights_with_another_pinned_hash_are_refused():
    with pytest.raises(torch_model.WeightsError, match="sha256 is 5793.*pins 0000.*refusing"):
        weights.load_pretrained(weights.PACKAGE_BACKBONE, weights.PACKAGE_WEIGHTS, "0" * 64)


def test_package_weights_only_fit_their_backbone():
    with pytest.raises(torch_model.WeightsError, match="fits only backbone 'timm:tf_efficientnet_lite0'"):
        weights.load_pretrained("timm:resnet18", weights.PACKAGE_WEIGHTS, "")


def test_in_order_mapping_names_the_first_tensor_that_does_not_fit():
    source = {"a": torch.zeros(2), "b": torch.zeros(3)}
    target = {"x": torch.zeros(2), "y": torch.zeros(4)}
    with pytest.raises(torch_model.WeightsError, match=r"'b' has shape \(3,\).*'y', needs \(4,\)"):
        weights.map_in_order(source, target, "weights.pth")


def test_a_local_safetensors_file_loads_into_a_timm_backbone(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = torch_model.create_backbone("timm:resnet10t")
    path = tmp_path / "resnet10t.safetensors"
    save_file(source.state_dict(), str(path))
    net, sha = weights.load_pretrained("timm:resnet10t", str(path), "")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values(), strict=True))
    assert len(sha) == 64


def test_a_local_torch_file_loads_into_a_torchvision_backbone(tmp_path):
    torch.manual_seed(2)
    source = torch_model.create_backbone("torchvision:mobilenet_v3_small")
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    net, _ = weights.load_pretrained("torchvision:mobilenet_v3_small", str(path), "")
    assert torch.equal(net.features[0][0].weight, source.features[0][0].weight)
    model = torch_model.PretrainedCNN(
        "torchvision:mobilenet_v3_small", num_classes=5, in_channels=1, image_size=16, input_size=32, net=net,
    )
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 5)


def test_weights_for_another_architecture_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(torch_model.create_backbone("timm:resnet10t").state_dict(), path)
    with pytest.raises(
        torch_model.WeightsError, match=r"wrong.pth: does not match backbone 'timm:tf_efficientnet_lite0'",
    ):
        weights.load_pretrained("timm:tf_efficientnet_lite0", str(path), "")


def test_a_missing_weights_file_is_named():
    with pytest.raises(torch_model.WeightsError, match=r"nowhere.pth: weights file not found"):
        weights.load_pretrained("timm:resnet10t", "nowhere.pth", "")


def test_a_malformed_backbone_spec_says_what_is_valid():
    with pytest.raises(torch_model.WeightsError, match="expected 'timm:<model name>' or 'torchvision:<model name>'"):
        torch_model.parse_backbone("efficientnet")


def test_pretrained_cnn_takes_grayscale_at_the_prepared_size(lite0):
    import copy

    model = torch_model.PretrainedCNN(
        weights.PACKAGE_BACKBONE, num_classes=10, in_channels=1, image_size=16, input_size=32, net=copy.deepcopy(lite0),
    )
    assert model.eval()(torch.rand(3, 1, 16, 16)).shape == (3, 10)


def test_frozen_layers_get_no_gradient_and_their_batch_norm_stays_in_eval_mode(lite0):
    import copy

    model = torch_model.PretrainedCNN(
        weights.PACKAGE_BACKBONE, num_classes=10, in_channels=1, image_size=16, input_size=32, net=copy.deepcopy(lite0),
    )
    model.set_trainable(0.0)
    model.train()
    assert all(p.requires_grad for p in model.head_parameters())
    assert not model.net.conv_stem.weight.requires_grad
    assert not model.net.bn1.training  # frozen BN keeps its ImageNet statistics
    before = model.net.bn1.running_mean.clone()
    model(torch.rand(8, 1, 16, 16)).sum().backward()
    assert torch.equal(model.net.bn1.running_mean, before)
    assert model.net.conv_stem.weight.grad is None

    model.set_trainable(0.3)
    model.train()
    trainable = [p.requires_grad for p in model.net.parameters()]
    assert trainable[-1] and not trainable[0]
    assert model.net.bn2.training  # the unfrozen top trains its batch norm


def test_the_gap_head_does_not_grow_with_the_image_and_the_flatten_head_does():
    def head_inputs(size: int, head: str) -> int:
        net = torch_model.ScratchCNN(num_classes=2, in_channels=3, image_size=size, head=head)
        return net.classifier[-4].in_features  # the first dense layer's input

    assert head_inputs(32, "gap") == head_inputs(64, "gap") == 256
    assert head_inputs(64, "flatten") == 256 * 4 * 4 and head_inputs(16, "flatten") == 128 * 4 * 4
    assert shapes.pooled_blocks(16) == 2 and shapes.pooled_blocks(64) == 4 and shapes.pooled_blocks(8) == 2
    photo_cnn = torch_model.ScratchCNN(num_classes=4, in_channels=3, image_size=180, input_size=64)
    logits = photo_cnn(torch.rand(2, 3, 180, 180))
    assert logits.shape == (2, 4)


def test_models_resize_inside_with_box_averaging_before_bilinear():
    image = torch.rand(1, 3, 180, 180)
    resize = torch_model.Resize(180, 64)  # 180 -> 2x2 boxes -> 90 -> bilinear 64
    assert (resize.pool, resize.bilinear) == (2, True)
    expected = nn.functional.interpolate(nn.functional.avg_pool2d(image, 2), size=(64, 64), mode="bilinear")
    assert torch.allclose(resize(image), expected)
    assert torch.equal(torch_model.Resize(16, 16)(image), image)
    flat = torch.full((1, 1, 8, 8), 0.25)
    assert torch.allclose(torch_model.Resize(8, 64)(flat), torch.full((1, 1, 64, 64), 0.25))


def test_auto_input_sizes_follow_the_stored_images():
    assert [shapes.scratch_input_size(s) for s in (8, 28, 180)] == [16, 28, 64]
    assert [shapes.pretrained_input_size(s, 224) for s in (8, 28, 32, 180, 256)] == [64, 128, 128, 224, 224]
    # single-channel: small glyphs at 64 (MNIST's 28 px included), a grey photo as a colour one
    assert [shapes.pretrained_input_size(s, 224, channels=1) for s in (8, 28, 32, 180)] == [64, 64, 64, 224]


def test_the_fine_tune_recipe_parts_features_depth_rates_and_frozen_statistics(lite0):
    import copy

    model = torch_model.PretrainedCNN(
        weights.PACKAGE_BACKBONE, num_classes=3, in_channels=3, image_size=64, input_size=64, net=copy.deepcopy(lite0),
    ).eval()
    x = torch.rand(2, 3, 64, 64)
    with model.head_removed() as head, torch.no_grad():
        features = model(x)  # (N, 1280): what the head reads
    assert features.shape == (2, 1280)
    with torch.no_grad():
        assert torch.allclose(head(features), model(x), atol=1e-6)  # the head restored, on those features

    units = model.depth_units()
    assert len(units) == 11  # conv_stem, bn1, the 7 stages of blocks, conv_head, bn2
    model.set_trainable(1.0)
    groups = model.param_groups(1e-3, 0.5)
    assert [g["lr"] for g in groups[-3:]] == [1e-3 * 0.25, 1e-3 * 0.5, 1e-3]  # bn2, then the head
    assert groups[0]["lr"] == 1e-3 * 0.5**11 and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    model.freeze_batch_norm = True
    model.train()
    assert not any(m.training for m in model.net.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.net.conv_stem.weight.requires_grad  # frozen statistics, not frozen weights


def test_pooled_features_fold_every_batch_norm_and_leave_the_model_to_train_on(lite0):
    import copy

    from pipeline.frameworks.torch import fold, transfer

    model = torch_model.PretrainedCNN(
        weights.PACKAGE_BACKBONE, num_classes=3, in_channels=3, image_size=40, input_size=48, net=copy.deepcopy(lite0),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (6, 40, 40, 3), dtype=torch.uint8).numpy()
    with model.head_removed(), torch.no_grad():
        folded, count = fold.folded(model)
        expected = model.eval()(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert count == batch_norms == 49 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    (features,) = transfer.pooled_features(model, [images], torch.device("cpu"), batch_size=4)
    assert features.shape == (6, 1280)
    assert torch.allclose(features, expected, rtol=1e-4, atol=1e-4)  # the same function, to float rounding
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # phase 2 starts from these


def test_only_a_batch_norm_straight_after_its_convolution_is_folded():
    from pipeline.frameworks.torch import fold

    class InvertedResidual(nn.Module):  # named as timm's block, with a BatchNorm on a different channel count
        def __init__(self):
            super().__init__()
            self.conv_pw, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(4)

    assert fold.folded(InvertedResidual())[1] == 0
    assert fold.folded(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)))[1] == 0  # not a known block
