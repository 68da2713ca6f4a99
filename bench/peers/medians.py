#!/usr/bin/env python3
"""Medians of bench/peers/compare.sh's JSON lines, one table per scenario.

    python3 bench/peers/medians.py compare.jsonl

CPU per delivery is (servers + Redis) CPU seconds per million deliveries
(= µs per delivery); "÷ floor" sets it against the median loopback floor of
the Chorus fanout runs of the same file (one write of the same frame per
delivery, by a minimal program); its latency is how long after being sent
those writes reached the bench's readers — what no server can beat on the
same machine with the same readers.
"""
import json
import statistics
import sys
from collections import defaultdict


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def main(path):
    runs = defaultdict(list)
    with open(path) as f:
        for line in f:
            v = json.loads(line)
            runs[(v["scenario"], v["target"])].append(v)
    floor = med(v.get("floor_us_per_delivery") for v in runs[("fanout", "chorus")])
    print(f"loopback floor (Chorus fanout runs, median): {fmt(floor)} µs per write")
    fl = [v["floor_latency_ms"] for v in runs[("fanout", "chorus")] if "floor_latency_ms" in v]
    if fl:
        print(f"loopback floor latency (same writes, median of runs): p50 "
              f"{fmt(med(x['p50'] for x in fl), 1)} / p99 {fmt(med(x['p99'] for x in fl), 1)} ms")
    others = med(v.get("machine", {}).get("others_cores") for vs in runs.values() for v in vs)
    print(f"other processes on the machine (median over runs): {fmt(others)} of 2 cores")
    for scenario in ("fanout", "saturate"):
        print(f"\n{scenario}: target | runs | CPU µs/delivery | ÷ floor | delivered / shed / lost "
              "| refused publishes | p50 / p99 ms | deliveries/s | peak RSS/node MiB")
        for target in ("chorus", "centrifugo", "socketio"):
            vs = runs.get((scenario, target))
            if not vs:
                continue
            cpu = med(v.get("cpu_s_per_m_deliveries") for v in vs)
            o = lambda k: med(v.get("outcome", {}).get(k) for v in vs)
            rss = med(max(v.get("peak_rss_mib", {0: 0}).values()) for v in vs)
            print(" | ".join([
                target, str(len(vs)), fmt(cpu),
                fmt(cpu / floor if cpu and floor else None),
                f"{fmt(o('delivered'), 0)} / {fmt(o('shed'), 0)} / {fmt(o('lost'), 0)}",
                fmt(med(v.get("publishes_refused") for v in vs), 0),
                f"{fmt(med(v['latency_ms']['p50'] for v in vs), 1)} / "
                f"{fmt(med(v['latency_ms']['p99'] for v in vs), 1)}",
                fmt(med(v.get("deliveries_per_sec") for v in vs), 0),
                fmt(rss, 1),
            ]))
    print("\nidle: target | runs | KiB per connection | connections | server CPU s to connect")
    for target in ("chorus", "centrifugo", "socketio"):
        vs = runs.get(("idle", target))
        if not vs:
            continue
        print(" | ".join([
            target, str(len(vs)),
            fmt(med(v.get("kib_per_connection") for v in vs)),
            fmt(med(v.get("connected") for v in vs), 0),
            fmt(med(v.get("cpu_s", {}).get("servers") for v in vs)),
        ]))


if __name__ == "__main__":
    main(sys.argv[1])
