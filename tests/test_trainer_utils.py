"""T3SDataCollator: pads the mask columns, gives anchors label -100, types a column from the whole
batch, and refuses what a trainer would silently drop or misread."""

import pytest
import torch

import t3s_kernels as t3s
from t3s_kernels.trainer_utils import T3SDataCollator
from tests.models import tiny_model

pytest.importorskip("transformers")

FEATURES = [
    dict(input_ids=[5, 6, 7], labels=[-100, 6, 7], t3s_weights=[False, True, False]),
    dict(input_ids=[8, 9], labels=[-100, 9], t3s_weights=[False, True]),
]


@pytest.fixture(scope="module")
def patched():
    return t3s.apply_t3s(tiny_model("qwen3"))


def test_pads_every_column_and_anchors_get_label_minus_100(patched):
    batch = T3SDataCollator(pad_token_id=0, model=patched)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100], [-100, 9, -100]]  # the anchor 7 is dropped
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["t3s_weights"].dtype == torch.bool
    assert batch["t3s_weights"].tolist() == [[False, True, False], [False, True, False]]


def test_anchors_count_keeps_the_labels(patched):
    batch = T3SDataCollator(pad_token_id=0, model=patched, anchors="count")(FEATURES)
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    with pytest.raises(ValueError, match="anchors must be one of"):
        T3SDataCollator(pad_token_id=0, anchors="drop")


def test_float_weights_keep_their_values_and_are_typed_by_the_whole_batch(patched):
    feats = [dict(input_ids=[1, 2], t3s_weights=[True, False]), dict(input_ids=[3], t3s_weights=[0.25])]
    with pytest.raises(ValueError, match="mixes bool masks and numeric weights"):
        T3SDataCollator(pad_token_id=0, model=patched)(feats)
    feats = [dict(input_ids=[1, 2], t3s_weights=[1, 0]), dict(input_ids=[3], t3s_weights=[0.25])]
    batch = T3SDataCollator(pad_token_id=0, model=patched)(feats)
    assert batch["t3s_weights"].dtype == torch.float32
    assert batch["t3s_weights"].tolist() == [[1.0, 0.0], [0.25, 0.0]]


def test_refuses_mask_column_for_unpatched_or_unknown_model():
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match="is not patched: call t3s_kernels.apply_t3s"):
        T3SDataCollator(pad_token_id=0, model=model)(FEATURES)
    with pytest.raises(ValueError, match="give T3SDataCollator the model"):
        T3SDataCollator(pad_token_id=0)(FEATURES)
    t3s.apply_t3s(model)
    assert T3SDataCollator(pad_token_id=0, model=model)(FEATURES)["t3s_weights"].shape == (2, 3)


def test_refuses_missing_mixed_and_misaligned_columns(patched):
    collate = T3SDataCollator(pad_token_id=0, model=patched)
    with pytest.raises(ValueError, match="example 1 of the batch lacks the 't3s_weights' column"):
        collate([FEATURES[0], dict(input_ids=[1], labels=[1])])
    with pytest.raises(ValueError, match="both 't3s_weights'"):
        collate([FEATURES[0], dict(input_ids=[1], t3s_force_mask=[True])])
    with pytest.raises(ValueError, match="'t3s_weights' has 2 entries but input_ids has 3"):
        collate([dict(input_ids=[1, 2, 3], t3s_weights=[True, False])])
    with pytest.raises(ValueError, match="is a force set: bool per token"):
        collate([dict(input_ids=[1, 2], t3s_force_mask=[0.5, 1.0])])
    batch = collate([dict(input_ids=[1, 2], labels=[1, 2], t3s_force_mask=[True, False]),
                     dict(input_ids=[3], labels=[3], t3s_force_mask=[False])])
    assert batch["t3s_force_mask"].tolist() == [[True, False], [False, False]]
    assert batch["labels"].tolist() == [[1, 2], [3, -100]]  # a force set never touches the labels


def test_each_trainer_refuses_the_other_rules_mask(patched):
    from t3s_kernels.masked_diffusion_trainer import masked_diffusion_compute_loss
    from t3s_kernels.toy import MASK_ID, tiny_bidirectional_lm

    ids = torch.randint(3, 200, (2, 6))
    with pytest.raises(ValueError, match="t3s_force_mask is a masked-diffusion force set"):
        patched.train()(input_ids=ids, labels=ids, t3s_force_mask=torch.ones_like(ids, dtype=torch.bool))
    student = t3s.apply_t3s(tiny_bidirectional_lm("llama"), mode="masked_diffusion")
    with pytest.raises(ValueError, match="an AR keep-mask"):
        masked_diffusion_compute_loss(student.train(), dict(input_ids=ids, labels=ids, t3s_weights=torch.ones(2, 6)),
                                      mask_token_id=MASK_ID)


def test_patched_forward_refuses_anchors_counted_by_num_items(patched):
    ids = torch.randint(3, 200, (2, 6))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0, 3] = False
    model = patched.train()
    with pytest.raises(ValueError, match="drops labelled tokens while num_items_in_batch"):
        model(input_ids=ids, labels=ids, t3s_weights=keep, num_items_in_batch=10)
    model(input_ids=ids, labels=ids.masked_fill(~keep, -100), t3s_weights=keep, num_items_in_batch=9)
    counted = t3s.apply_t3s(tiny_model("qwen3"), anchors="count").train()
    counted(input_ids=ids, labels=ids, t3s_weights=keep, num_items_in_batch=10)


def test_masked_diffusion_loss_refuses_a_causal_patch(patched):
    # is_t3s_patched alone is not enough: a causal patch would shift the labels of the masked positions
    from t3s_kernels.masked_diffusion_trainer import masked_diffusion_compute_loss
    from t3s_kernels.toy import MASK_ID

    ids = torch.randint(3, 200, (2, 6))
    with pytest.raises(ValueError, match="needs a model patched with apply_t3s.*mode='masked_diffusion'.*this one is "
                                         "causal"):
        masked_diffusion_compute_loss(patched.train(), dict(input_ids=ids, labels=ids), mask_token_id=MASK_ID)
