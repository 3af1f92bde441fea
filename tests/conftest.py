"""Shared fixtures: the tiny random Qwen2.5-VL is built once per test session (well under a second)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import toy

    return toy.build_model(str(tmp_path_factory.mktemp("tiny")), "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer, image_processor), fp32 on CPU. Tests must not train this shared copy."""
    from vlaa import qwen

    model, tok, ip = qwen.load_model(tiny_model_dir, "float32", "cpu")
    return model.eval(), tok, ip


def solid_image(size, colour=(220, 40, 40)):
    from PIL import Image

    return Image.new("RGB", (size, size), colour)
