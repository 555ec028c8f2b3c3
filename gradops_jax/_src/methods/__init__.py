"""Aggregation methods other than GradOPS, all behind the same interface."""
