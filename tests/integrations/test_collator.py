"""T3SDataCollator pads the mask column and refuses it for an unpatched model."""

import pytest
import torch
from models import tiny_model

import t3s_kernels as t3s
from t3s_kernels.trainer_utils import T3SDataCollator

FEATURES = [
    dict(input_ids=[5, 6, 7], labels=[-100, 6, 7], t3s_weights=[False, True, False]),
    dict(input_ids=[8, 9], labels=[-100, 9], t3s_weights=[False, True]),
]


def test_pads_every_column():
    batch = T3SDataCollator(pad_token_id=0)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["t3s_weights"].dtype == torch.bool
    assert batch["t3s_weights"].tolist() == [[False, True, False], [False, True, False]]


def test_float_weights_keep_their_values():
    feats = [dict(input_ids=[1, 2], t3s_weights=[0.5, 2.0]), dict(input_ids=[3], t3s_weights=[1.0])]
    batch = T3SDataCollator(pad_token_id=0)(feats)
    assert batch["t3s_weights"].tolist() == [[0.5, 2.0], [1.0, 0.0]]


def test_refuses_mask_column_for_unpatched_model():
    pytest.importorskip("transformers")
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match="is not patched: call t3s_kernels.apply_t3s"):
        T3SDataCollator(pad_token_id=0, model=model)(FEATURES)
    t3s.apply_t3s(model)
    assert T3SDataCollator(pad_token_id=0, model=model)(FEATURES)["t3s_weights"].shape == (2, 3)


def test_rejects_misaligned_mask():
    bad = [dict(input_ids=[1, 2, 3], t3s_weights=[True, False])]
    with pytest.raises(ValueError, match="'t3s_weights' has 2 entries but input_ids has 3"):
        T3SDataCollator(pad_token_id=0)(bad)
