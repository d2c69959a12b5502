"""Benchmarks the way the field scores them: HumanEval, MMLU, GSM8K and perplexity.

Tasks (`humaneval`, `mmlu`, `gsm8k`, `perplexity`) are written against `backends.Backend`,
implemented in-process (`InProcessBackend`, through `dsv3.LLM`) and over HTTP
(`http_backend.OpenAIBackend`, any OpenAI-compatible server). See docs/eval.md.
"""

from dsv3.eval.backends import Backend, InProcessBackend, Loglikelihood, RollingScore
from dsv3.eval.report import Metric, TaskResult

__all__ = ["Backend", "InProcessBackend", "Loglikelihood", "RollingScore", "Metric", "TaskResult"]
