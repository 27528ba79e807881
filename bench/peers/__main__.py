"""``python -m bench.peers --check | --compare``: our service against TorchServe, LitServe, Ray Serve and a plain
FastAPI app, each doing the same work per request (bench/peers/work.py), all running at once.

``--check`` starts them and compares their answers with in-process ONNX Runtime. ``--compare`` checks, then
takes wrk windows from each server in turn (``bench.http.interleaved``) at each concurrency with a one-PNG
body, then a 64-PNG body for the servers that answer every file of such a request, then the realistic inputs
and their mix (bench/peers/kinds.py), and writes bench/results/peers.{json,md}. Needs `make bench-peers` first
(the peers' own venv, .bench-venv/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from bench import http
from bench.peers import kinds
from bench.peers.check import PeerMismatch, check_peer
from bench.peers.cpu import OtherLoad, idle_shares, wait_quiet, watchers
from bench.peers.servers import PeerServer, peer_servers
from bench.report import kinds_section
from training.data import load_mnist, resolve_data_dir

BOOK = http.REPO.parent / "shared" / "book" / "convnet.pth"
RESULTS = http.REPO / "bench" / "results"
OURS = "bento"
SCENARIOS = ("png1", "png16", "png64", "kinds")


def servers(export_dir: Path, home: str, only: list[str]) -> dict[str, http.Server]:
    known = {OURS: http.bento_server(OURS, home), **peer_servers(export_dir)}
    unknown = sorted(set(only) - set(known))
    if unknown:
        sys.exit(f"error: unknown server(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return {name: s for name, s in known.items() if not only or name in only}


def predict_path(server: http.Server) -> str:
    return server.predict_path if isinstance(server, PeerServer) else "/predict"


def multi_image(server: http.Server) -> bool:
    return server.multi_image if isinstance(server, PeerServer) else True


def check_all(live: dict[str, http.Server], export_dir: Path, mnist_u8) -> dict[str, str]:
    notes, failed = {}, []
    for name, server in live.items():
        try:
            notes[name] = check_peer(server.url, predict_path(server), export_dir, mnist_u8, multi_image(server))
        except PeerMismatch as exc:
            failed.append(f"{name}: {exc}")
        else:
            print(f"{name}: {notes[name]}")
    if failed:
        sys.exit("error: " + "\n".join(failed))
    return notes


def compare(
    live: dict[str, http.Server],
    images,
    clients: list[int],
    rounds: int,
    window_s: int,
    alone: bool,
    only_scenarios: tuple[str, ...] = ("png1", "png64"),
) -> list[dict]:
    rows = []
    scenarios = {"png1": (1, window_s), "png16": (16, window_s), "png64": (64, 2 * window_s)}  # 64: longer windows
    steps = [(s, c) for s in scenarios if s in only_scenarios for c in clients]
    for scenario, c in tqdm(steps, desc="peers", unit="point", disable=None):
        count, seconds = scenarios[scenario]
        body, ctype = http.png_request(images, count)
        loads = {
            name: (predict_path(server), body, ctype, seconds)
            for name, server in live.items()
            if count == 1 or multi_image(server)
        }
        with OtherLoad(live) as other:
            windows = http.interleaved(live, loads, c, rounds, alone, watchers(live, OURS))
        for name, ws in windows.items():
            row = {"server": name, "scenario": scenario, "concurrency": c, **http.median_of(ws)}
            row["other_cpu_share"] = other.share
            row |= {"worker_requests": [w["worker_requests"] for w in ws]} if name == OURS else {}
            rows.append({**row, "images_per_s": row["requests_per_s"] * count})
    return rows


def markdown(result: dict) -> str:
    out = [
        f"# Peer servers, {result['date']}\n",
        f"{result['machine']}. Medians of {result['rounds']} interleaved wrk windows of {result['window_s']} s "
        "(twice that for 64 PNGs); all servers started at once, each doing the same work per request"
        + ("; the others frozen (SIGSTOP) during each one's windows. " if result["others_frozen"] else ". ")
        + "'other load': the share of the machine that processes outside this benchmark took meanwhile.\n",
    ]
    titles = (("png1", "one PNG per request"), ("png16", "16 PNGs per request"), ("png64", "64 PNGs per request"))
    for scenario, title in titles:
        rows = [r for r in result["rows"] if r["scenario"] == scenario]
        if not rows:
            continue
        out += [
            f"\n## {title}\n",
            "| server | clients | req/s | images/s | p50 ms | p99 ms | errors | server CPU ms/request | cores | "
            "other load |",
        ]
        out += ["|---" * 10 + "|"]
        out += [
            f"| {r['server']} | {r['concurrency']} | {r['requests_per_s']:,.0f} | {r['images_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r.get('cpu_ms', float('nan')):.2f} | "
            f"{r.get('cores_used', float('nan')):.2f} | {r['other_cpu_share']:.0%} |"
            for r in sorted(rows, key=lambda r: (r["concurrency"], -r["requests_per_s"]))
        ]
        out += [
            f"- ours at {r['concurrency']} clients, requests per HTTP worker in each window: "
            + "; ".join(", ".join(f"worker {w}: {n:,}" for w, n in split.items()) for split in r["worker_requests"])
            for r in rows
            if r.get("worker_requests")
        ]
    out += kinds_section(result.get("kinds"))
    out += ["\n## CPU use of each server while idle, not frozen\n"]
    out += [f"- {name}: {share:.1%} of the machine" for name, share in result["idle_cpu_share"].items()]
    out += ["\n## Correctness check\n"] + [f"- {name}: {note}" for name, note in result["checks"].items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="start every server and compare its answers")
    mode.add_argument("--compare", action="store_true", help="check, then measure, and write bench/results")
    p.add_argument("--only", nargs="*", default=[], help=f"servers to start (default: {OURS} and every peer)")
    p.add_argument("--clients", type=int, nargs="*", default=[8, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=5, help="seconds per wrk window (64 PNGs: twice this)")
    p.add_argument("--checkpoint", default=str(BOOK), help="the model every server serves")
    p.add_argument("--no-freeze", action="store_true", help="leave the other servers running during a window")
    p.add_argument("--wait-quiet", type=float, default=600, help="seconds to wait for other load to stop")
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        help="png1: one PNG per request; png16: 16; png64: 64; kinds: the realistic inputs and their mix",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one round of 2 s windows, 8 clients; of the realistic inputs, the canvas and the mix",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.window, args.clients = 1, 2, [8]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind the servers' context managers
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    images = load_mnist(resolve_data_dir(), train=False)[0][:64].numpy()
    with tempfile.TemporaryDirectory() as home, contextlib.ExitStack() as stack:
        from export.build import ExportConfig, build

        os.environ["BENTOML_HOME"] = home
        export_dir = Path(home) / "export"
        build(ExportConfig(checkpoint=args.checkpoint, out=str(export_dir), int8=False))
        live = {}
        for name, server in tqdm(servers(export_dir, home, args.only).items(), desc="start", disable=None):
            live[name] = stack.enter_context(server)
        checks = check_all(live, export_dir, images)
        if args.check:
            return 0
        quiet = wait_quiet(live, limit_s=args.wait_quiet)
        if quiet >= 0.1:
            logging.warning("other processes still take %.0f%% of the machine; measuring anyway", 100 * quiet)
        idle = idle_shares(live)
        rows = compare(live, images, args.clients, args.rounds, args.window, not args.no_freeze, args.scenarios)
        found = None
        if "kinds" in args.scenarios:
            cfg = kinds.QUICK if args.quick else kinds.KindsConfig()
            paths = {name: predict_path(server) for name, server in live.items()}
            found = kinds.measure(live, paths, cfg, images, export_dir, not args.no_freeze, OURS)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "rounds": args.rounds,
        "window_s": args.window,
        "others_frozen": not args.no_freeze,
        "checks": checks,
        "idle_cpu_share": idle,
        "rows": rows,
        "kinds": found,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "peers.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
