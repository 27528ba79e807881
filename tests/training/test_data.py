import shutil

import pytest
import torch
from torchvision import transforms

from training.data import DataError, Normalization, load_mnist, raw_folder, to_model_input


def test_loads_the_real_test_set(mnist_test):
    images, labels = mnist_test
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and set(labels.tolist()) == set(range(10))


def test_prepared_tensors_equal_the_books_transforms(mnist_test):
    images, _ = mnist_test
    norm = Normalization()
    book = transforms.Compose([transforms.ToTensor(), transforms.Normalize((norm.mean,), (norm.std,))])
    from PIL import Image

    expected = torch.stack([book(Image.fromarray(img.numpy(), mode="L")) for img in images[:64]])
    assert torch.equal(to_model_input(images[:64], norm), expected)


def copy_raw(data_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(raw_folder(data_dir), raw_folder(target))
    for f in raw_folder(target).iterdir():
        f.chmod(0o644)
    return target


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        load_mnist(tmp_path / "nowhere", train=False, download=False)


def test_partial_data_set_lists_the_missing_file(data_dir, tmp_path):
    root = copy_raw(data_dir, tmp_path)
    (raw_folder(root) / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_mnist(root, train=False, download=False)


def test_truncated_file_is_reported(data_dir, tmp_path):
    root = copy_raw(data_dir, tmp_path)
    path = raw_folder(root) / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_mnist(root, train=False, download=False)


def test_garbage_header_is_reported(data_dir, tmp_path):
    root = copy_raw(data_dir, tmp_path)
    path = raw_folder(root) / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"not an idx file at all" * 10)
    with pytest.raises(DataError):
        load_mnist(root, train=False, download=False)
