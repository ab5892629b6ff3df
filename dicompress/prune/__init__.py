"""Depth pruning: which blocks go (plan.py, pure index logic) and how kept blocks are rebuilt (blocks.py)."""
from .blocks import average_parameters_, teacher_io
from .plan import amber_groups, check_intervals, list_of, random_intervals

__all__ = ["amber_groups", "average_parameters_", "check_intervals", "list_of", "random_intervals", "teacher_io"]
