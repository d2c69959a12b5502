"""Helpers of `bench/default_model_eval.py`: one module per measurement of issue 7."""
