"""The names modules outside the heads imported from here before each head had its own module."""
from .base import Head, class_weights, proba_over
from .registry import load_head, make_head

__all__ = ["Head", "class_weights", "load_head", "make_head", "proba_over"]
