"""The T3S pipeline: score checkpoints, find the bottleneck, select tokens, retrain."""

from .bottleneck import BottleneckCallback, TroughDetector, find_bottleneck
from .data import Example, load_examples
from .scoring import score_dataset
from .selection import RULES, Selection, attach_mask, load_selection, select
from .store import ScoreSet, ScoreStore, StoreError

__all__ = ["BottleneckCallback", "TroughDetector", "find_bottleneck", "Example", "load_examples", "score_dataset",
           "RULES", "Selection", "attach_mask", "load_selection", "select", "ScoreSet", "ScoreStore", "StoreError"]
