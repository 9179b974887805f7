"""The router: a small MLP over the base model's token ids (model.py), and top-p selection (top_p.py)."""

from .model import Router, hashed_features
from .top_p import check_max_loras, check_top_p, route_top_p

__all__ = ["Router", "check_max_loras", "check_top_p", "hashed_features", "route_top_p"]
