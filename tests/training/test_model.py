import warnings

import pytest
import torch
import torch.nn.functional as F

from training.checkpoint import CheckpointError, build_model, load_checkpoint
from training.model import ConvNet, ModelConfig, count_parameters


def test_parameter_count_and_layer_shapes():
    model = ConvNet()
    assert count_parameters(model) == 300_426
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "cn1.weight": (16, 1, 3, 3),
        "cn1.bias": (16,),
        "cn2.weight": (32, 16, 3, 3),
        "cn2.bias": (32,),
        "fc1.weight": (64, 4608),
        "fc1.bias": (64,),
        "fc2.weight": (10, 64),
        "fc2.bias": (10,),
    }
    assert ModelConfig().flat_features == 4608


@pytest.mark.parametrize("batch", [1, 3, 32])
def test_forward_gives_log_probabilities(batch):
    model = ConvNet().eval()
    out = model(torch.randn(batch, 1, 28, 28))
    assert out.shape == (batch, 10)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(batch))


def test_training_mode_forward_raises_no_warning():
    # the book's Dropout2d on a 2-D tensor warns in current PyTorch; our element-wise dropout must not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConvNet().train()(torch.randn(4, 1, 28, 28)).sum().backward()


def test_pool_before_relu_matches_the_books_order():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(16, 1, 28, 28)
    h = F.relu(model.cn1(x))
    book = F.max_pool2d(F.relu(model.cn2(h)), 2)  # the book: ReLU, then pool
    ours = F.relu(F.max_pool2d(model.cn2(h), 2))
    assert torch.equal(book, ours)


def test_example_input_has_a_batch_above_one():
    assert ConvNet().example_input_array.shape == (2, 1, 28, 28)


def test_books_checkpoint_loads_strictly(book_checkpoint):
    state = torch.load(book_checkpoint, weights_only=True)
    ConvNet().load_state_dict(state, strict=True)
    ckpt = load_checkpoint(book_checkpoint)
    assert ckpt.provenance["source"] == "state_dict"
    assert not build_model(ckpt).training


def test_wrong_shape_names_the_layer(tmp_path):
    state = ConvNet().state_dict()
    state["fc1.weight"] = torch.zeros(32, 4608)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"fc1.weight has shape \(32, 4608\)"):
        build_model(load_checkpoint(path))
