"""Evaluation: students, training on bundles or real data, top-1 on a real test split, DD-Ranking export."""

from .students import STUDENTS, build_student

__all__ = ["STUDENTS", "build_student"]
