"""Turns one bench.run result into JSON, a Markdown report and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def markdown(result: dict) -> str:
    out = [
        f"# Benchmarks\n\nMachine: {result['machine']}. Date: {result['date']}. "
        f"Mode: {'quick' if result['quick'] else 'full'} (`make {'bench-quick' if result['quick'] else 'bench'}`). "
        f"Model: `{Path(result['checkpoint']).name}`. All figures are medians over repeated windows; "
        "ratios compare numbers measured in the same run.\n"
    ]
    if t := result.get("training"):
        b, o = statistics.median(t["book"]["epoch_seconds"]), statistics.median(t["ours"]["epoch_seconds"])
        out.append(
            "## Training (one epoch)\n\n| loop | images | seconds/epoch | test accuracy |\n| --- | --- | --- | --- |"
        )
        out.append(
            f"| the book's (PIL + transforms per sample, DataLoader) | {t['train_samples']} | {b:.1f} | {100 * t['book']['test_accuracy']:.2f}% |"
        )
        out.append(
            f"| `python -m training` (tensors prepared once, channels_last) | {t['train_samples']} | {o:.1f} | {100 * t['ours']['test_accuracy']:.2f}% |"
        )
        rounds = ", ".join(f"{r:.2f}x" for r in t.get("round_speedups", []))
        out.append(
            f"\nSpeed-up: **{t['speedup']:.2f}x** (medians; the loops alternated, each round's ratio: {rounds}).\n"
        )
    out.append("## In-process inference (images/s; latency per batch in ms)\n")
    inf = result["inference"]
    batches = sorted({r["batch"] for r in inf})
    out.append("| format | " + " | ".join(f"batch {b}" for b in batches) + " |")
    out.append("| --- |" + " --- |" * len(batches))
    for fmt in dict.fromkeys(r["format"] for r in inf):
        cells = [next(r for r in inf if r["format"] == fmt and r["batch"] == b) for b in batches]
        out.append(
            f"| {fmt} | " + " | ".join(f"{c['images_per_s']:,.0f} ({c['latency_ms']:.2f})" for c in cells) + " |"
        )
    h = result["http"]["rows"]
    out.append("\n## HTTP serving (wrk, loopback, same machine)\n")
    out.append("| server | payload | clients | req/s | images/s | p50 ms | p90 ms | p99 ms | errors |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in h:
        payload = (
            "64 PNGs/request"
            if r["scenario"] == "png64"
            else (
                "float32 bytes + JSON dims"
                if r["server"] == "book-flask"
                else "empty"
                if r["server"] == "bento-noop"
                else "1 PNG/request"
            )
        )
        out.append(
            f"| {r['server']} | {payload} | {r['concurrency']} | {r['requests_per_s']:,.0f} | {r['images_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |"
        )
    top = max(r["concurrency"] for r in h)
    get = {(r["server"], r["scenario"]): r for r in h if r["concurrency"] == top}
    ours, book = get.get(("bento-batched", "png1")), get.get(("book-flask", "png1"))
    unb, noop = get.get(("bento-unbatched", "png1")), get.get(("bento-noop", "png1"))
    many, many_unb = get.get(("bento-batched", "png64")), get.get(("bento-unbatched", "png64"))
    onnx_ceiling = max((r["images_per_s"] for r in inf if r["format"] == "onnx"), default=None)
    ratio = ours["requests_per_s"] / book["requests_per_s"]
    out.append(
        f"\nAt {top} clients, one image per request: batched service {ours['requests_per_s']:,.0f} req/s, "
        f"{ratio:.2f}x the book's Flask server "
        f"(p99 {ours['p99_ms']:.0f} ms against {book['p99_ms']:.0f} ms), "
        f"{ours['requests_per_s'] / unb['requests_per_s']:.2f}x the same service unbatched, "
        f"{ours['requests_per_s'] / noop['requests_per_s']:.0%} of BentoML's do-nothing endpoint "
        f"({noop['requests_per_s']:,.0f} req/s)."
    )
    checks = [
        ("at least 2x the book's throughput", ratio >= 2),
        ("zero errors", ours["errors"] == 0),
        ("a lower p99 than the book's", ours["p99_ms"] < book["p99_ms"]),
    ]
    out.append("Targets: " + "; ".join(f"{name}: {'met' if ok else '**not met**'}" for name, ok in checks) + ".")
    if many and onnx_ceiling:
        out.append(
            f"With 64 images per request: {many['images_per_s']:,.0f} images/s, "
            f"{many['images_per_s'] / onnx_ceiling:.0%} of in-process ONNX Runtime's best ({onnx_ceiling:,.0f} images/s)"
            + (
                f"; unbatched {many_unb['images_per_s']:,.0f} images/s, {many_unb['images_per_s'] / onnx_ceiling:.0%}."
                if many_unb
                else "."
            )
        )
    if m := result["http"].get("memory"):
        out.append(
            f"\nMemory: the batched server's RSS (all processes) was {m['rss_mb_before']:.0f} MiB before and "
            f"{m['rss_mb_after']:.0f} MiB after {m['seconds']} s at {top} clients "
            f"({m['rss_mb_after'] / m['rss_mb_before'] - 1:+.1%})"
            + (
                f"; every 5 s during the run: {', '.join(f'{v:.0f}' for v in m['rss_mb_samples'])} MiB."
                if m.get("rss_mb_samples")
                else "."
            )
        )
    out.append(
        "\nWhat these numbers changed in the service, and how each change was measured: [performance.md](performance.md)."
    )
    out.append("\n![HTTP](../bench/results/http.png)\n![inference](../bench/results/inference.png)\n")
    return "\n".join(out) + "\n"


def plots(result: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = [r for r in result["http"]["rows"] if r["scenario"] == "png1"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for server in dict.fromkeys(r["server"] for r in h):
        rows = [r for r in h if r["server"] == server]
        cs = [r["concurrency"] for r in rows]
        a1.plot(cs, [r["requests_per_s"] for r in rows], "o-", label=server)
        a2.plot(cs, [r["p99_ms"] for r in rows], "o-", label=server)
    a1.set(xlabel="concurrent clients", ylabel="requests/s", title="throughput, one image per request", xscale="log")
    a2.set(xlabel="concurrent clients", ylabel="p99 latency (ms)", title="p99 latency", xscale="log", yscale="log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "http.png", dpi=100)
    plt.close(fig)
    inf = result["inference"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for fmt in dict.fromkeys(r["format"] for r in inf):
        rows = [r for r in inf if r["format"] == fmt]
        ax.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], "o-", label=fmt)
    ax.set(xlabel="batch size", ylabel="images/s", title="in-process inference", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "inference.png", dpi=100)
    plt.close(fig)


def write_all(result: dict, folder: Path, doc: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc.parent.mkdir(parents=True, exist_ok=True)
    (folder / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (folder / "latest.md").write_text(md)
    doc.write_text(md)
    plots(result, folder)
