"""Scoring methods: metrics, the evaluation of a method over test pairs, the report."""
