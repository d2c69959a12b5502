"""How fast the default model answers: MTP speculative decoding and 20-token infill latency.

Speculative decoding is measured one request at a time (the latency case it exists for): each
prompt is decoded greedily with 0, 1 and 2 MTP draft tokens; the outputs must be identical, the
acceptance per draft position comes from the engine's `SpecStats`. Infill latency is the wall time
of a `max_tokens=20` fill-in-the-middle request, in-process and through `/v1/completions`.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

from dsv3.engine.speculative import SpecStats
from dsv3.engine.sampling import SamplingParams


def timed_request(engine, ids: list[int], params: SamplingParams, rid: str) -> dict:
    """Run one request alone: token ids, time to first token, total time, decode tokens/s."""
    t0 = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": ids}, params)
    first, out = None, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid:
                first = first or time.perf_counter()
                out = o
    end = time.perf_counter()
    toks = list(out.outputs[0].token_ids)
    return {"token_ids": toks, "ttft": first - t0, "total": end - t0, "decode_s": end - first}


def percentiles(xs: list[float]) -> dict:
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return {"p50": statistics.median(xs), "p90": qs[8], "mean": statistics.fmean(xs), "n": len(xs)}


def speculative(make_llm, prompts: list[list[int]], max_tokens: int, ks=(1, 2), progress: bool = True) -> dict:
    """Greedy decoding of `prompts` with k = 0 and each k in `ks`; acceptance, tokens/s, identical outputs."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    runs, ref = {}, None
    for k in (0, *ks):
        llm = make_llm(num_speculative_tokens=k)
        timed_request(llm.engine, prompts[0], params, "warmup")
        if k:
            llm.engine.drafter.stats = SpecStats(k)
        outs = [timed_request(llm.engine, p, params, f"spec{k}-{i}")
                for i, p in enumerate(tqdm(prompts, desc=f"decode k={k}", disable=not progress))]
        decoded = sum(len(o["token_ids"]) - 1 for o in outs)
        row = {"decode_tokens_per_s": decoded / sum(o["decode_s"] for o in outs),
               "tokens_per_s": sum(len(o["token_ids"]) for o in outs) / sum(o["total"] for o in outs)}
        if k:
            stats = llm.engine.drafter.stats
            row.update(acceptance_per_position=stats.acceptance_rate, mean_accepted_per_step=stats.mean_accepted,
                       drafted=stats.drafted, accepted=stats.accepted)
            same = [o["token_ids"] == r for o, r in zip(outs, ref)]
            row["identical_outputs"] = all(same)
            row["mismatched_prompts"] = [i for i, s in enumerate(same) if not s]
            row["speedup"] = row["decode_tokens_per_s"] / runs[0]["decode_tokens_per_s"]
        else:
            ref = [o["token_ids"] for o in outs]
        runs[k] = row
        del llm
    return {"prompts": len(prompts), "max_tokens": max_tokens, "by_k": {str(k): v for k, v in runs.items()}}


def infill_in_process(llm, prompts: list[list[int]], max_tokens: int = 20, progress: bool = True) -> dict:
    """One request at a time; the first prompt only warms up."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    timed_request(llm.engine, prompts[0], params, "warmup")
    lat, ttft = [], []
    for i, p in enumerate(tqdm(prompts[1:], desc="infill (engine)", disable=not progress)):
        r = timed_request(llm.engine, p, params, f"infill-{i}")
        lat.append(r["total"])
        ttft.append(r["ttft"])
    return {"latency_s": percentiles(lat), "ttft_s": percentiles(ttft), "prompt_tokens": statistics.fmean(map(len, prompts[1:]))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(load):
    """`dsv3 serve`'s app under uvicorn in a thread on a free local port; yields the base URL once the model is loaded."""
    import uvicorn

    from dsv3.serve import ServeConfig, create_app

    app = create_app(ServeConfig(served_model_name="dsv3"), load)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    try:
        while not (server.started and app.state.ready):
            if app.state.load_error is not None:
                raise app.state.load_error
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def infill_http(url: str, items: list[tuple[str, str]], max_tokens: int = 20, progress: bool = True) -> dict:
    """POST /v1/completions {prompt, suffix, max_tokens} per (prefix, suffix), one at a time; the first only warms up."""
    import httpx

    lat, ntok = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i, (prefix, suffix) in enumerate(tqdm(items, desc="infill (HTTP)", disable=not progress)):
            body = {"prompt": prefix, "suffix": suffix, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            r = client.post("/v1/completions", json=body)
            dt = time.perf_counter() - t0
            r.raise_for_status()
            if i:  # the first request warms up
                lat.append(dt)
                ntok.append(r.json()["usage"]["completion_tokens"])
    return {"latency_s": percentiles(lat), "completion_tokens": statistics.fmean(ntok)}
