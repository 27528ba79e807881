"""Turns one bench.run result into JSON, a Markdown report and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench import overload as ov


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
    out += http_sections(result)
    out.append(
        "\nWhat these numbers changed in the service, and how each change was measured: [performance.md](performance.md)."
    )
    out.append("\n![HTTP](../bench/results/http.png)\n![inference](../bench/results/inference.png)\n")
    return "\n".join(out) + "\n"


PEERS = ("torchserve", "litserve", "rayserve", "fastapi")
PAYLOAD = {"book-flask": "float32 bytes + JSON dims", "bento-noop": "empty"}


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def http_sections(result: dict) -> list[str]:
    h = result["http"]
    rows = h["rows"]
    out = ["\n## HTTP serving (wrk on loopback; every server up at once, each measured alone with the others frozen)\n"]
    out.append("### One PNG per request\n")
    work = h.get("work_ms")
    if work:
        out.append(
            f"The work itself, in process on one core (the project's preprocessing of the 28x28 PNG, ONNX Runtime with "
            f"one thread at batch 1, the answer's format; the lowest of 5 rounds of CPU time): **{work:.3f} ms** a "
            "request. Server CPU: what all of a server's processes used in its windows, over the requests answered; "
            "cores: that CPU over the window's length.\n"
        )
    out.append(
        "| server | payload | clients | req/s | p50 ms | p90 ms | p99 ms | errors | server CPU ms/request | cores |"
    )
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(
        (r for r in rows if r["scenario"] == "png1"), key=lambda r: (r["concurrency"], -r["requests_per_s"])
    ):
        out.append(
            f"| {r['server']} | {PAYLOAD.get(r['server'], '1 PNG')} | {r['concurrency']} | {r['requests_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {_server_cpu(r)} |"
        )
    out.append("")
    for c in sorted({r["concurrency"] for r in rows}):
        get = {r["server"]: r for r in rows if r["scenario"] == "png1" and r["concurrency"] == c}
        ours = get.get("bento")
        peers = [get[p] for p in PEERS if p in get]
        if not ours or not peers:
            continue
        best = max(peers, key=lambda r: r["requests_per_s"])
        ratio = ours["requests_per_s"] / best["requests_per_s"]
        out.append(
            f"- **{c} clients**: ours {ours['requests_per_s']:,.0f} req/s, p99 {ours['p99_ms']:.0f} ms; the best peer, "
            f"{best['server']}, {best['requests_per_s']:,.0f} req/s, p99 {best['p99_ms']:.0f} ms: **{ratio:.2f}x**. "
            f"Targets: at least 1.2x: {_met(ratio >= 1.2)}; a p99 no higher: {_met(ours['p99_ms'] <= best['p99_ms'])}; "
            f"zero errors: {_met(ours['errors'] == 0)}."
            + (
                f" The book's Flask server: {get['book-flask']['requests_per_s']:,.0f} req/s."
                if "book-flask" in get
                else ""
            )
            + (
                f" BentoML's do-nothing endpoint: {get['bento-noop']['requests_per_s']:,.0f} req/s."
                if "bento-noop" in get
                else ""
            )
            + _cpu_target(ours, best, work)
            + _split(ours)
        )
    out += _sixteen(rows)
    out.append("\n### 64 PNGs per request\n")
    out.append("TorchServe is not in this table: it hands its handler only the last file of a repeated form field.\n")
    out.append("| server | clients | images/s | p50 ms | p99 ms | errors (non-2xx included) |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    many = sorted((r for r in rows if r["scenario"] == "png64"), key=lambda r: (r["concurrency"], -r["images_per_s"]))
    for r in many:
        out.append(
            f"| {r['server']} | {r['concurrency']} | {r['images_per_s']:,.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |"
        )
    top = max((r for r in many if r["server"] == "bento"), key=lambda r: r["concurrency"], default=None)
    if top:
        out.append(
            f"\nAt {top['concurrency']} clients: {top['errors']} errors (target zero 503s: {_met(top['errors'] == 0)}), "
            f"p99 {top['p99_ms'] / 1000:.2f} s (target at most 2 s: {_met(top['p99_ms'] <= 2000)})."
        )
    if v2 := h.get("v2"):
        ceiling = result.get("onnx_one_thread_batch64")
        out.append("\n### Open Inference Protocol: 64 images per request, binary tensors both ways\n")
        out.append(
            f"In-process ONNX Runtime with one thread (each work process's setting) at batch 64: "
            f"{ceiling:,.0f} images/s, measured in this run.\n"
        )
        out.append("| request | clients | images/s | share of in-process | p50 ms | p99 ms | errors |")
        out.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in v2:
            out.append(
                f"| {r['request']} | {r['concurrency']} | {r['images_per_s']:,.0f} | {r['images_per_s'] / ceiling:.0%} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |"
            )
        best = max(r["images_per_s"] for r in v2 if r["request"].startswith("mnist-convnet"))
        out.append(
            f"\nTarget, at least half of in-process: {_met(best >= ceiling / 2)} ({best / ceiling:.0%} at best)."
        )
    if b := h.get("burst"):
        out.append("\n### Burst recovery (one PNG per request)\n")
        out.append("| lone client before | right after | 5 s after | burst | burst req/s | burst errors |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        out.append(
            f"| {b['lone_before_ms']:.1f} ms | {b['lone_right_after_ms']:.1f} ms | {b['lone_after_5s_ms']:.1f} ms | "
            f"{b['clients']} clients, {b['seconds']} s | {b['burst_requests_per_s']:,.0f} | {b['burst_errors']} |"
        )
        out.append(f"\nBack to the pre-burst median (within 1.5x) 5 s after: {_met(b['recovered'])}.")
    if o := h.get("overload"):
        statuses = ", ".join(f"{n:,} x {code}" for code, n in sorted(o["statuses"].items())) or "none"
        errors = ", ".join(f"{n:,} x {msg}" for msg, n in o["errors"].items()) or "none"
        out.append(f"\n### Overload: {o['connections']:,} connections at once (hey)\n")
        out.append(
            f"Answers: {statuses}. Connection errors (resets and the like): {errors}. p99 {o['p99_ms']:,.0f} ms, "
            f"{o['requests_per_s']:,.0f} req/s. A lone client: {o['lone_before_ms']:.1f} ms before, "
            f"{o['lone_after_5s_ms']:.1f} ms 5 s after the load stopped."
        )
    out += kinds_section(h.get("kinds"))
    out += overload_sections(h)
    if m := h.get("memory"):
        out.append(
            f"\nMemory: the service's RSS (all processes) was {m['rss_mb_before']:.0f} MiB before and "
            f"{m['rss_mb_after']:.0f} MiB after {m['seconds']} s at 64 clients ({m['rss_mb_after'] / m['rss_mb_before'] - 1:+.1%})"
            + (
                f"; every 5 s during the run: {', '.join(f'{v:.0f}' for v in m['rss_mb_samples'])} MiB."
                if m.get("rss_mb_samples")
                else "."
            )
        )
    return out


OURS = "bento"
KIND_WHAT = {
    "canvas": "the page's 280x280 drawing pad (RGBA PNG)",
    "screenshot_300": "a 375x300 screenshot (RGB PNG)",
    "photo_1mp": "a 1-megapixel phone photo (JPEG)",
    "photo_12mp": "a 12-megapixel phone photo (JPEG)",
}


def _kib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def cores_note(cores: dict) -> str:
    """One window's ``bench.peers.cpu.cores_split``: "total 1.85 (worker 1 0.92, worker 2 0.90)"."""
    workers = ", ".join(f"{label} {c:.2f}" for label, c in cores["workers"].items())
    return f"total {cores['total']:.2f}" + (f" ({workers})" if workers else "")


def kinds_section(k: dict | None) -> list[str]:
    """bench/peers/kinds.py's rows: ours and the peers per realistic input and on the mix, with ours / best peer."""
    if not k or not k.get("rows"):
        return []
    cfg, rows = k["config"], k["rows"]
    mix = " : ".join(f"{n} {kind}" for kind, n in k["mix"].items())
    mix_note = (
        f"The mix: by request, {mix} (workloads.MIX); {cfg['mix_cycles'] * sum(k['mix'].values())} bodies of it "
        "prebuilt, each image its own digit, which each wrk thread sends in turn. "
        if cfg.get("mix", True)
        else ""
    )
    out = [
        f"\n### Realistic inputs: one image per request, {cfg['clients']} clients\n",
        "Made from real MNIST test digits (bench/workloads.py); every server runs the project's own preprocessing. "
        f"{mix_note}Medians of {cfg['rounds']} interleaved windows of {cfg['window_s']:g} s per server (fewer and "
        "shorter than the 28x28 PNG's, to keep `make bench` short), the others frozen. Errors: wrk's connection "
        "errors and timeouts plus every answer of 400 or above. Ours / best peer: our req/s over the fastest peer's "
        "on that input. Other load: the share of the machine processes outside the benchmark took meanwhile"
        + (f"; these rows took {k['seconds']:.0f} s in all" if "seconds" in k else "")
        + ".\n",
    ]
    out += _table(
        "input | server | req/s | images/s | p50 ms | p99 ms | errors | server CPU ms/request | ours / best peer | "
        "other load"
    )
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        group = sorted((r for r in rows if r["scenario"] == scenario), key=lambda r: -r["requests_per_s"])
        ratio = _ours_over_best(group)
        label = f"{scenario} ({_kib(k['body_bytes'][scenario])})"
        other = f"{group[0]['other_cpu_share']:.0%}" if "other_cpu_share" in group[0] else ""
        for r in group:
            mark = f"**{ratio:.2f}x**" if r["server"] == OURS and ratio is not None else ""
            out.append(
                f"| {label} | {r['server']} | {r['requests_per_s']:,.0f} | {r['images_per_s']:,.0f} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {_cpu_ms(r)} | {mark} | {other} |"
            )
            label = other = ""
    what = "; ".join(f"{kind}: {KIND_WHAT[kind]}" for kind in cfg["kinds"] if kind in KIND_WHAT)
    out.append(f"\nInputs: {what}.\n" if what else "")
    ours = [r for r in rows if r["server"] == OURS and r.get("cores")]
    if ours:
        out.append(
            "Cores ours used in each window: all its processes, and each HTTP worker (a child of `bentoml serve`) "
            "with its work processes:\n"
        )
        out += [f"- {r['scenario']}: " + "; ".join(map(cores_note, r["cores"])) + _split(r) for r in ours]
    out.append("\nAnswers on these files, each alone in a request, against in-process ONNX Runtime:\n")
    out += [f"- {name}: {note}" for name, note in k["checks"].items()]
    return out


def _ours_over_best(group: list[dict]) -> float | None:
    ours = next((r for r in group if r["server"] == OURS), None)
    peers = [r for r in group if r["server"] != OURS]
    if not ours or not peers:
        return None
    best = max(r["requests_per_s"] for r in peers)
    return ours["requests_per_s"] / best if best else None


def _answers(counts: dict) -> str:
    return ", ".join(f"{n:,} x {what}" for what, n in sorted(counts.items())) or "none"


def _lone(s: dict) -> str:
    return f"{s['ok_share']:.0%} of {s['requests']} ({_answers(s['outcomes'])}), p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s"


def _livez(s: dict) -> str:
    return f"{s['p50_s'] * 1000:.0f} / {s['max_s'] * 1000:.0f} ms"


def _cpu(load: dict) -> str:
    """The load generator's own CPU, as a share of one core over its run."""
    return f"{load['cpu_s'] / load['seconds']:.0%} of a core"


def _livez_met(s: dict) -> bool:
    return s["requests"] > 0 and s["ok_share"] == 1 and s["max_s"] <= ov.LIVEZ_MAX_S


def _table(header: str) -> list[str]:
    """A Markdown table's head from its column names, separated by " | "."""
    return [f"| {header} |", "|" + " --- |" * len(header.split(" | "))]


def overload_sections(h: dict) -> list[str]:
    """The rows of bench/overload.py: overload goodput per body kind, and fairness under hog clients."""
    return _goodput_section(h.get("overload_goodput") or []) + _fairness_section(h.get("fairness") or [])


def _goodput_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = [
        f"\n### Overload goodput: {ov.IMAGES} images per request, {ov.OVERLOAD_FACTOR}x the clients of saturation, "
        "each resending at once when refused (hey)\n",
        "Goodput: images answered with 200 per second. Saturation: the fewest clients of the sweep whose goodput is "
        "within 5% of its best; the overload's goodput is compared with that best. During the overload window a /livez "
        f"probe every {ov.LIVEZ_EVERY_S} s and a lone client (one 28x28 PNG every {ov.LONE_EVERY_S} s, "
        f"timeout {ov.LONE_TIMEOUT_S:g} s; latency over all its requests).\n",
    ]
    out += _table(
        "body | sweep (clients: images/s) | saturation | overload | images/s | ratio | answers | connection errors | hey's CPU | /livez p50 / max | lone client 200s"
    )
    for r in rows:
        o, sweep = r["overload"], ", ".join(f"{s['clients']}: {s['images_per_s']:,.0f}" for s in r["sweep"])
        out.append(
            f"| {r['kind']} ({r['body_bytes'] / 2**20:.2f} MiB) | {sweep} | {r['saturation_clients']} clients, {r['saturation_images_per_s']:,.0f} | "
            f"{o['clients']} clients | {o['images_per_s']:,.0f} | {r['ratio']:.0%} | {_answers(o['statuses'])} | {_answers(o['errors'])} | "
            f"{_cpu(o)} | {_livez(r['livez'])} | {_lone(r['lone'])} |"
        )
    out.append("")
    for r in rows:
        out.append(
            f"- **{r['kind']}**: overload goodput {r['ratio']:.0%} of saturation (target at least {ov.GOODPUT_RATIO:.0%}: "
            f"{_met(r['ratio'] >= ov.GOODPUT_RATIO)}); /livez max {r['livez']['max_s']:.2f} s, {r['livez']['ok_share']:.0%} answered "
            f"(target all within {ov.LIVEZ_MAX_S:g} s: {_met(_livez_met(r['livez']))}); the lone client still answered: "
            f"{'yes' if r['lone']['ok_share'] > 0 else '**no**'} ({r['lone']['ok_share']:.0%})."
        )
    return out


def _fairness_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = [
        "\n### Fairness under saturation: hog clients resending at once (hey), a lone client beside them\n",
        f"The lone client sends one 28x28 digit every {ov.LONE_EVERY_S} s to the hogs' path (a PNG to /predict, a JSON "
        f"array to /predict_array), timeout {ov.LONE_TIMEOUT_S:g} s; its latency is over all its requests.\n",
    ]
    out += _table(
        "hogs | each request | hogs' answers | hogs' p99 / slowest | hogs' connection errors | hey's CPU | lone client 200s | /livez p50 / max"
    )
    for r in rows:
        hg = r["hogs"]
        out.append(
            f"| {hg['clients']} x {r['path']} | {r['what']}, {r['body_bytes'] / 2**20:.1f} MiB | {_answers(hg['statuses'])} in {hg['seconds']:.0f} s | "
            f"{hg['p99_s']:.1f} / {hg['slowest_s']:.1f} s | {_answers(hg['errors'])} | {_cpu(hg)} | {_lone(r['lone'])} | {_livez(r['livez'])} |"
        )
    out.append("")
    for r in rows:
        lone = r["lone"]
        out.append(
            f"- **{r['hog']}**: the lone client got {lone['ok_share']:.0%} answered with 200 (target at least {ov.LONE_SHARE:.0%}: "
            f"{_met(lone['ok_share'] >= ov.LONE_SHARE)}), p99 {lone['p99_s']:.2f} s (target at most {ov.LONE_P99_S:g} s: "
            f"{_met(lone['p99_s'] <= ov.LONE_P99_S)}); /livez all within {ov.LIVEZ_MAX_S:g} s: {_met(_livez_met(r['livez']))}."
        )
    return out


def _cpu_ms(r: dict) -> str:
    return f"{r['cpu_ms']:.2f}" if "cpu_ms" in r else ""


def _server_cpu(r: dict) -> str:
    """Two table cells: the server's CPU ms per request and the cores it used, or empty ones."""
    return f"{r['cpu_ms']:.2f} | {r['cores_used']:.2f}" if "cpu_ms" in r else " | "


def _cpu_target(ours: dict, best: dict, work: float | None) -> str:
    """Our CPU per request against the in-process work (target: at most 2.5x) and against the best peer's."""
    if "cpu_ms" not in ours or not work:
        return ""
    times = ours["cpu_ms"] / work
    peer = f"; {best['server']}'s {best['cpu_ms']:.2f} ms" if "cpu_ms" in best else ""
    return (
        f" CPU per request: {ours['cpu_ms']:.2f} ms, {times:.1f}x the in-process work (target at most 2.5x: "
        f"{_met(times <= 2.5)}){peer}."
    )


def _split(ours: dict) -> str:
    """Our requests per HTTP worker in each window: how evenly the workers shared the connections."""
    windows = ours.get("worker_requests")
    if not windows:
        return ""
    shares = [
        " / ".join(f"{100 * n / total:.0f}%" for _, n in sorted(split.items()))
        for split in windows
        if (total := sum(split.values()))
    ]
    return f" Requests per HTTP worker, each window: {', '.join(shares)}." if shares else ""


def _sixteen(rows: list[dict]) -> list[str]:
    """The 16-PNG rows (8 clients): images/s, against the best peer's (target at least 1.2x)."""
    group = sorted((r for r in rows if r["scenario"] == "png16"), key=lambda r: -r["images_per_s"])
    if not group:
        return []
    out = ["\n### 16 PNGs per request, 8 clients\n"]
    out += _table("server | images/s | req/s | p50 ms | p99 ms | errors | server CPU ms/request | cores")
    out += [
        f"| {r['server']} | {r['images_per_s']:,.0f} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.0f} | "
        f"{r['p99_ms']:.0f} | {r['errors']} | {_server_cpu(r)} |"
        for r in group
    ]
    ours = next((r for r in group if r["server"] == OURS), None)
    peers = [r for r in group if r["server"] in PEERS]
    if ours and peers:
        best = max(peers, key=lambda r: r["images_per_s"])
        ratio = ours["images_per_s"] / best["images_per_s"]
        out.append(
            f"\nOurs {ours['images_per_s']:,.0f} images/s, p99 {ours['p99_ms']:.0f} ms; the best peer, {best['server']}, "
            f"{best['images_per_s']:,.0f}, p99 {best['p99_ms']:.0f} ms: **{ratio:.2f}x**. Targets: at least 1.2x: "
            f"{_met(ratio >= 1.2)}; a p99 no higher: {_met(ours['p99_ms'] <= best['p99_ms'])}; zero errors: "
            f"{_met(ours['errors'] == 0)}.{_split(ours)}"
        )
    return out


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
