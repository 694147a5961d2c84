#!/usr/bin/env python3
"""Summarise scripts/bench-tftp results (JSON lines) as Markdown tables: medians of the
repetitions, and pxed as a ratio to the best peer (throughput: pxed / peer, higher is better;
completion time: peer / pxed, higher is better)."""
import json
import statistics
import sys
from collections import defaultdict

PEERS = ["tftpd-hpa", "dnsmasq", "atftpd"]
LOCKSTEP_ONLY = {"tftpd-hpa", "dnsmasq"}

runs = defaultdict(list)
rss = {}
loads = defaultdict(list)
for line in open(sys.argv[1]):
    rec = json.loads(line)
    key = (rec["leg"], rec["server"], rec["kind"])
    if rec["kind"] == "peak_rss_kib":
        rss[(rec["leg"], rec["server"])] = rec["result"]
        continue
    # The server's CPU for the run is measured around the client, outside its result.
    runs[key].append(dict(rec["result"], server_cpu_s=rec.get("server_cpu_s")))
    loads[rec["leg"]].append(rec["load_avg"])


def median(key, field):
    vals = [r[field] for r in runs.get(key, []) if r["failures"] == 0 and r.get(field) is not None]
    return statistics.median(vals) if vals else None


def failures(key):
    return sum(r["failures"] for r in runs.get(key, []))


def fmt(v, unit=""):
    return "FAILED" if v is None else f"{v:.1f}{unit}"


for leg in sorted({k[0] for k in runs}, key=lambda l: l != "loopback"):
    la = loads[leg]
    print(f"\n### {leg} (load average during the run {min(la):.1f}-{max(la):.1f})\n")
    print("Single 64 MiB read, MiB/s (median of the repetitions); pxed / best peer.\n")
    print("| blksize | windowsize | pxed | tftpd-hpa | dnsmasq | atftpd | pxed / best peer | pxed / max(hpa, dnsmasq) |")
    print("|---|---|---|---|---|---|---|---|")
    kinds = sorted(
        {k[2] for k in runs if k[0] == leg and k[2].startswith("single")},
        key=lambda k: tuple(int(p.split("=")[1]) for p in k.split()[1:]),
    )
    for kind in kinds:
        blk, win = (p.split("=")[1] for p in kind.split()[1:])
        cells = {}
        for s in ["pxed"] + PEERS:
            k = kind if not (s in LOCKSTEP_ONLY and win != "1") else f"single blksize={blk} windowsize=1"
            if (leg, s, k) in runs:
                cells[s] = median((leg, s, k), "mib_s")
                granted = [r for r in runs[(leg, s, k)] if r["failures"] == 0]
                if granted and (str(granted[0]["granted_blksize"]), str(granted[0]["granted_windowsize"])) != (blk, win):
                    cells[s + "_note"] = f" ({granted[0]['granted_blksize']}/{granted[0]['granted_windowsize']})"
            else:
                cells[s] = "n/a"
        peers = [(cells[p], p) for p in PEERS if isinstance(cells.get(p), float)]
        best = max(peers) if peers else None
        old = [cells[p] for p in LOCKSTEP_ONLY if isinstance(cells.get(p), float)]
        px = cells["pxed"]
        ratio = f"{px / best[0]:.2f}x ({best[1]})" if isinstance(px, float) and best else "-"
        ratio_old = f"{px / max(old):.2f}x" if isinstance(px, float) and old else "-"
        row = [blk, win]
        for s in ["pxed"] + PEERS:
            v = cells[s]
            row.append((fmt(v) if v != "n/a" else "n/a") + cells.get(s + "_note", ""))
        row += [ratio, ratio_old]
        print("| " + " | ".join(row) + " |")
    print("\nConcurrent clients, each reading 1 MiB (blksize 1468, lock-step): completion time in s"
          " (median), failed reads over all repetitions; best peer time / pxed time.\n")
    print("| clients | pxed | tftpd-hpa | dnsmasq | atftpd | best peer / pxed | client CPU / wall (pxed) |")
    print("|---|---|---|---|---|---|---|")
    for kind in sorted({k[2] for k in runs if k[0] == leg and k[2].startswith("concurrent")},
                       key=lambda k: int(k.split("=")[1])):
        row = [kind.split("=")[1]]
        times = {}
        for s in ["pxed"] + PEERS:
            key = (leg, s, kind)
            if key not in runs:
                row.append("n/a")
                continue
            t = median(key, "wall_s")
            times[s] = t
            row.append(f"{fmt(t, ' s')}, {failures(key)} failed")
        peers = [(times[p], p) for p in PEERS if times.get(p) is not None]
        best = min(peers) if peers else None
        px = times.get("pxed")
        row.append(f"{best[0] / px:.2f}x ({best[1]})" if px and best else "-")
        pr = [r for r in runs.get((leg, "pxed", kind), [])]
        row.append(", ".join(f"{r['client_cpu_s']:.1f}/{r['wall_s']:.1f} s" for r in pr) or "-")
        print("| " + " | ".join(row) + " |")
    print("\nBusy seconds of the servers' CPU for the same runs (user, system, irq, softirq; median):"
          " what serving the clients cost each server, its kernel work for the sockets included"
          " (on loopback and veth that includes delivering its datagrams to the client); pxed /"
          " best peer, lower is better.\n")
    print("| clients | pxed | tftpd-hpa | dnsmasq | atftpd | pxed / best peer |")
    print("|---|---|---|---|---|---|")
    for kind in sorted({k[2] for k in runs if k[0] == leg and k[2].startswith("concurrent")},
                       key=lambda k: int(k.split("=")[1])):
        cpu = {s: median((leg, s, kind), "server_cpu_s") for s in ["pxed"] + PEERS}
        row = [kind.split("=")[1]] + [fmt(cpu[s], " s") if cpu[s] is not None else "n/a"
                                      for s in ["pxed"] + PEERS]
        peers = [(cpu[p], p) for p in PEERS if cpu[p] is not None]
        best = min(peers) if peers else None
        row.append(f"{cpu['pxed'] / best[0]:.2f}x ({best[1]})" if cpu["pxed"] and best and best[0] > 0 else "-")
        print("| " + " | ".join(row) + " |")
    print("\nServer peak RSS (VmHWM, KiB): " + ", ".join(
        f"{s} {rss[(leg, s)] if rss[(leg, s)] is not None else 'n/a (process gone)'}" for s in ["pxed"] + PEERS if (leg, s) in rss))
