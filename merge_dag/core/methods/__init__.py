"""Merge methods: one file each, all named in registry.py."""

from .base import MergeMethod, Param, TensorTask
from .registry import METHODS, get_method

__all__ = ["MergeMethod", "Param", "TensorTask", "METHODS", "get_method"]
