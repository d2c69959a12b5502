"""The printed table and the PNG summary of `bench/default_model_eval.py`'s results."""

from __future__ import annotations

from pathlib import Path


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def rows(r: dict) -> list[tuple[str, str, str]]:
    """(measure, value, target) lines for whatever parts were run."""
    out = []
    if "bits_per_byte" in r:
        b = r["bits_per_byte"]
        for key, label in (("all", "held-out files"), ("stdlib", "held-out stdlib files")):
            s = b.get(key, {})
            if s.get("files"):
                out.append((f"bits/byte, {label} ({s['files']} files, {s['bytes']:,} B)",
                            f"model {_f(s['model_bits_per_byte'])} | xz -9e per file {_f(s['xz_bits_per_byte_per_file'])}"
                            f", concatenated {_f(s['xz_bits_per_byte_concat'])}", "< xz, <= 1.2"))
    if "function_completion" in r:
        f = r["function_completion"]
        out.append((f"held-out functions parsing after completion{', body fits the budget' if 'any_length' in f else ''} (n={f['n']})",
                    f"{f['parse_rate']:.1%} (with a body: {f['parse_rate_with_body']:.1%})", ">= 70%"))
        if "any_length" in f:
            g = f["any_length"]
            out.append((f"  same, functions of any length (n={g['n']})",
                        f"{g['parse_rate']:.1%} (with a body: {g['parse_rate_with_body']:.1%})", "reported"))
    if "fim" in r:
        out.append((f"single-line FIM exact match (n={r['fim']['n']})", f"{r['fim']['exact_match']:.1%}", ">= 15%"))
        if "edit_similarity" in r["fim"]:
            out.append(("single-line FIM edit similarity", f"{r['fim']['edit_similarity']:.1%}", "reported"))
        if "prefix_only_exact_match" in r["fim"]:
            out.append(("the same lines left to right, prefix only: exact / edit similarity",
                        f"{r['fim']['prefix_only_exact_match']:.1%} / {r['fim']['prefix_only_edit_similarity']:.1%}",
                        "reported"))
        if "pass_at_k_exact_match" in r["fim"]:
            out.append((f"  any of {r['fim']['samples']} samples at T={r['fim']['sample_temperature']} exact (pass@k: no "
                        "choice among them can do better); from the prefix alone",
                        f"{r['fim']['pass_at_k_exact_match']:.1%}; {r['fim']['prefix_only_pass_at_k_exact_match']:.1%}",
                        "reported"))
    if "mtp" in r:
        for k, row in r["mtp"]["by_k"].items():
            if k == "0":
                out.append(("decode tokens/s, no speculation", _f(row["decode_tokens_per_s"], 1), ""))
                continue
            acc = ", ".join(f"{a:.1%}" for a in row["acceptance_per_position"])
            out.append((f"MTP k={k}: acceptance per position | speed-up",
                        f"{acc} | {row['speedup']:.2f}x ({_f(row['decode_tokens_per_s'], 1)} tok/s)"
                        f"{'' if row['identical_outputs'] else ' OUTPUTS DIFFER'}", "reported"))
    for key, label in (("engine", "in-process"), ("http", "HTTP /v1/completions")):
        lat = r.get("infill_latency", {}).get(key)
        if lat:
            s = lat["latency_s"]
            out.append((f"20-token infill latency, {label} (n={s['n']})",
                        f"p50 {s['p50'] * 1e3:.0f} ms, p90 {s['p90'] * 1e3:.0f} ms", "p50 < 300 ms"))
    if r.get("chat", {}).get("n"):
        c = r["chat"]
        out.append((f"chat: held-out 'write a function' answers that parse with a def{', reference fits' if 'any_length' in c else ''} (n={c['n']})",
                    f"{c['parse_rate']:.1%} (right name {c['right_name_rate']:.1%})", ">= 60%"))
        if "any_length" in c:
            g = c["any_length"]
            out.append((f"  same, instructions of any length (n={g['n']})",
                        f"{g['parse_rate']:.1%} (right name {g['right_name_rate']:.1%})", "reported"))
    elif "chat" in r:
        out.append(("chat parse rate", r["chat"].get("skipped", "skipped"), ">= 60%"))
    return out


def table(r: dict) -> str:
    lines = rows(r)
    w0 = max([len(a) for a, _, _ in lines] + [7])
    w1 = max([len(b) for _, b, _ in lines] + [5])
    head = f"{'measure':<{w0}}  {'value':<{w1}}  target"
    return "\n".join([head, "-" * len(head)] + [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in lines])


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    ax = axes[0]
    b = r.get("bits_per_byte", {})
    groups = [k for k in ("all", "stdlib") if b.get(k, {}).get("files")]
    for j, (key, label) in enumerate((("model_bits_per_byte", "model"), ("xz_bits_per_byte_per_file", "xz -9e per file"),
                                      ("xz_bits_per_byte_concat", "xz -9e concatenated"))):
        ax.bar([i + 0.27 * (j - 1) for i in range(len(groups))], [b[g][key] for g in groups], 0.27, label=label)
    ax.set_xticks(range(len(groups)), [f"held-out {g}" for g in groups])
    ax.axhline(1.2, color="k", ls="--", lw=0.8)
    ax.set_title("bits per byte (lower is better)")
    ax.legend(fontsize=8)
    ax = axes[1]
    names, vals, targets = [], [], []
    for key, label, target, field in (("function_completion", "functions\nparse", 0.7, "parse_rate"),
                                      ("fim", "FIM line\nexact", None, "exact_match"), ("chat", "chat\nparse", 0.6, "parse_rate")):
        if r.get(key, {}).get("n"):
            names.append(label)
            vals.append(r[key][field])
            targets.append(target)
    ax.bar(names, vals, color="tab:green")
    for i, t in enumerate(targets):
        if t is not None:
            ax.plot([i - 0.4, i + 0.4], [t, t], "k--", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_title("held-out rates (dashed: targets)")
    ax = axes[2]
    by_k = r.get("mtp", {}).get("by_k", {})
    for k, row in by_k.items():
        if k != "0":
            ax.plot(range(1, len(row["acceptance_per_position"]) + 1), row["acceptance_per_position"], "o-",
                    label=f"k={k}, {row['speedup']:.2f}x")
    ax.set_ylim(0, 1)
    ax.set_xlabel("draft position")
    ax.set_title("MTP draft acceptance")
    if by_k:
        ax.legend(fontsize=8)
    ax = axes[3]
    lat = r.get("infill_latency", {})
    keys = [k for k in ("engine", "http") if lat.get(k)]
    for j, q in enumerate(("p50", "p90")):
        ax.bar([i + 0.4 * (j - 0.5) for i in range(len(keys))], [lat[k]["latency_s"][q] * 1e3 for k in keys], 0.4, label=q)
    ax.set_xticks(range(len(keys)), keys)
    ax.axhline(300, color="k", ls="--", lw=0.8)
    ax.set_title("20-token infill latency (ms)")
    ax.legend(fontsize=8)
    fig.suptitle(f"default model: {r.get('model', '')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
