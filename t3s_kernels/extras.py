"""The optional extras (pyproject.toml): which one a feature needs, said when the feature is used.
``import t3s_kernels`` needs torch alone; the rest is imported where a feature needs it, through
``require``."""

from __future__ import annotations

import importlib

# The top-level module -> the extra that installs it.
EXTRA_OF = {"transformers": "hf", "datasets": "hf", "tokenizers": "hf", "pyarrow": "hf", "matplotlib": "plot",
            "triton": "triton", "flash_attn": "flash", "liger_kernel": "bench", "cut_cross_entropy": "bench",
            "quack": "bench", "math_verify": "math"}


def require(module: str, feature: str):
    """``module`` imported, or an ImportError naming ``feature`` and the extra that installs the module."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRA_OF[top]
        raise ImportError(f"{feature} needs {top}, which the '{extra}' extra installs: "
                          f"pip install 't3s-kernels[{extra}]'") from e


def pyplot(feature: str):
    """matplotlib's pyplot on the file-only Agg backend (plots are written, never shown), for ``feature``."""
    matplotlib = require("matplotlib", feature)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", feature)
