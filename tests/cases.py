"""The option combinations every backend is checked on (each against the fp64 reference)."""

import pytest

# (input options for make_inputs, loss options)
CASES = {
    "plain": ({}, {}),
    "bias": ({"bias": True}, {}),
    "smoothing": ({}, {"label_smoothing": 0.1}),
    "z_loss": ({}, {"z_loss": 1e-3}),
    "softcap": ({"logit_scale": 3.0}, {"softcap": 4.0}),
    # a model's own logit multiplier (Cohere's 0.0625; Granite's 1 / logits_scaling) on logits of spread ~2
    "logit_scale": ({"logit_scale": 16.0}, {"logit_scale": 0.0625}),
    "weights_with_zeros_and_ignored": ({"weights": "zeros", "ignored": 5}, {}),
    "random_weights": ({"weights": "random"}, {"ce_weight": 0.7}),
    "all_weights_zero": ({"weights": "all_zero"}, {}),
    "all_ignored": ({"ignored": 37}, {}),
    "everything": ({"bias": True, "weights": "zeros", "ignored": 4, "logit_scale": 2.0},
                   {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "ce_weight": 0.7, "logit_scale": 0.8}),
}

# The two that run in the GPU check (pytest -m gpu): the plainest and the richest.
GPU_CASES = ("plain", "everything")
CASE_PARAMS = [pytest.param(*v, id=k, marks=[pytest.mark.gpu] if k in GPU_CASES else []) for k, v in CASES.items()]
