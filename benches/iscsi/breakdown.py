#!/usr/bin/env python3
"""Where the time of one queue-depth-1 command goes, from a packet capture on the loopback interface.

Usage: breakdown.py [--fio FIO.json] [--sched BEFORE AFTER] [CAPTURE.pcap ISCSI_PORT [REPLICA_PORT ...]]

The capture (tcpdump -i lo) timestamps every segment when its sender's syscall puts it on the loopback
device, so the gaps between the segments of one command split its latency between the processes: fio (the
initiator), the target (the controller) and each replica. At queue depth 1 exactly one command is in flight,
so the segments between a command and its response belong to it. Pure ACKs (no payload) are ignored.

    command PDU ──► controller ──► request to replica 1..N ──► replies ──► controller ──► response PDU
        |-- inbound --|-- fan-out --|---- replica round trips ----|-- outbound --|   |-- fio's turn --|

Printed per phase: mean, median and 99th percentile over every complete command, in microseconds. With
--sched, two snapshots of each process's scheduler statistics (lines "ROLE RUN_NS WAIT_NS TIMESLICES", the
sums of /proc/PID/task/*/schedstat, taken around the job): per command, the CPU time of each process, the
time it was runnable but waited for a CPU, and how often it was scheduled in. Those do not depend on how the
machine's other load shared the wall clock, as the phases above do. With --fio, fio's JSON output of the job:
its completion latency (mean, median, p99) and its command count, which divides the scheduler statistics when
there is no capture (a capture slows every loopback send, so CPU per command is best read without one).
"""

import json

import struct
import sys


def packets(path):
    """(timestamp in µs, src port, dst port, TCP payload length) of each captured IPv4/IPv6 TCP segment."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == 0xA1B2C3D4:
        scale = 1.0  # microseconds
    elif magic == 0xA1B23C4D:
        scale = 1e-3  # nanoseconds
    else:
        sys.exit(f"{path}: not a little-endian pcap file (magic {magic:#x}); capture with tcpdump -w")
    linktype = struct.unpack_from("<I", data, 20)[0]
    link_len = {1: 14, 113: 16, 276: 20}.get(linktype)
    if link_len is None:
        sys.exit(f"{path}: link type {linktype} not handled (capture on lo with tcpdump -i lo)")
    at = 24
    while at + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack_from("<IIII", data, at)
        at += 16
        pkt = data[at : at + caplen]
        at += caplen
        ip = pkt[link_len:]
        if not ip:
            continue
        version = ip[0] >> 4
        if version == 4:
            ihl = (ip[0] & 0xF) * 4
            total = struct.unpack_from(">H", ip, 2)[0]
            if ip[9] != 6:
                continue
            tcp = ip[ihl:]
            ip_payload = total - ihl
        elif version == 6:
            if ip[6] != 6:
                continue
            tcp = ip[40:]
            ip_payload = struct.unpack_from(">H", ip, 4)[0]
        else:
            continue
        sport, dport = struct.unpack_from(">HH", tcp, 0)
        doff = (tcp[12] >> 4) * 4
        yield sec * 1e6 + frac * scale, sport, dport, ip_payload - doff


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def fio_job(path):
    """(commands, completion latency mean, median, p99 in µs) of the one job in fio's JSON output."""
    job = json.load(open(path))["jobs"][0]
    side = max((job["read"], job["write"]), key=lambda s: s["total_ios"])
    clat = side["clat_ns"]
    pct = clat.get("percentile", {})
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] * 1000 / max(side["total_ios"], 1)
    tail = {p: pct.get(f"{p:.6f}", 0) / 1000 for p in (90.0, 95.0, 99.0, 99.9)}
    return side["total_ios"], clat["mean"] / 1000, pct.get("50.000000", 0) / 1000, tail, cpu


def print_sched(sched, commands):
    before, after = (
        {line.split()[0]: [int(x) for x in line.split()[1:]] for line in open(path)} for path in sched
    )
    print("per command, by process: CPU µs, µs runnable but waiting for a CPU, times scheduled in")
    total = 0
    for role, (run, wait, slices) in after.items():
        r0, w0, s0 = before[role]
        total += run - r0
        print(f"  {role:<12} {(run - r0) / commands / 1000:7.1f} {(wait - w0) / commands / 1000:7.1f} "
              f"{(slices - s0) / commands:6.2f}")
    print(f"  {'all':<12} {total / commands / 1000:7.1f}")


def main():
    args = sys.argv[1:]
    sched = None
    fio = None
    while args[:1] in (["--sched"], ["--fio"]):
        if args[0] == "--sched":
            sched, args = args[1:3], args[3:]
        else:
            fio, args = fio_job(args[1]), args[2:]
    if fio:
        n, mean, median, tail, cpu = fio
        print(f"fio: {n} commands, completion latency {mean:.1f} / {median:.1f} / {tail[99.0]:.1f} µs (mean / median / p99), "
              f"{cpu:.1f} µs of fio's CPU per command")
        print("  tail: " + ", ".join(f"p{p:g} {v:.0f} µs" for p, v in tail.items()))
    if not args and fio and sched:
        print_sched(sched, fio[0])
        return
    if len(args) < 2:
        sys.exit(__doc__)
    capture = args[0]
    iscsi = int(args[1])
    replicas = [int(p) for p in args[2:]]
    phases = {name: [] for name in ["inbound", "fan-out", "replica", "replicas", "outbound", "target", "fio"]}
    per_replica = {p: [] for p in replicas}
    current = None  # the command in flight: {"cmd": t, "req": {port: t}, "rep": {port: t}}
    last_response = None
    commands = 0
    for t, sport, dport, length in packets(capture):
        if length <= 0:
            continue
        if dport == iscsi:
            commands += current is None
            # A command (with its immediate data, possibly in several segments): start at its first one.
            if current is None:
                if last_response is not None:
                    phases["fio"].append(t - last_response)
                current = {"cmd": t, "req": {}, "rep": {}}
        elif sport == iscsi:
            # Complete when every replica sent a request answered (a write goes to all, a read to one).
            if current is not None and (not replicas or (current["req"] and current["rep"].keys() == current["req"].keys())):
                c = current
                phases["target"].append(t - c["cmd"])
                if replicas:
                    first_req = min(c["req"].values())
                    last_req = max(c["req"].values())
                    last_rep = max(c["rep"].values())
                    phases["inbound"].append(first_req - c["cmd"])
                    phases["fan-out"].append(last_req - first_req)
                    phases["replicas"].append(last_rep - first_req)
                    phases["outbound"].append(t - last_rep)
                    for p in c["req"]:
                        rtt = c["rep"][p] - c["req"][p]
                        per_replica[p].append(rtt)
                        phases["replica"].append(rtt)
            current = None
            last_response = t
        elif current is not None and dport in per_replica:
            current["req"].setdefault(dport, t)
        elif current is not None and sport in per_replica and sport in current["req"]:
            current["rep"][sport] = t
    n = len(phases["target"])
    if n == 0:
        sys.exit("no complete command found: was the capture taken at queue depth 1, on the right ports?")
    print(f"{n} commands at queue depth 1 (µs: mean / median / p99)")
    rows = [
        ("target: command in → response out", "target"),
        ("  controller inbound: command in → first replica request out", "inbound"),
        ("  fan-out: first → last replica request out", "fan-out"),
        ("  replicas: first request out → last reply in", "replicas"),
        ("  one replica round trip (request out → its reply in)", "replica"),
        ("  controller outbound: last reply in → response out", "outbound"),
        ("fio: response out → next command in", "fio"),
    ]
    for label, key in rows:
        v = phases[key]
        if v:
            print(f"{label:<64} {sum(v) / len(v):7.1f} {percentile(v, 0.5):7.1f} {percentile(v, 0.99):7.1f}")
    for i, p in enumerate(replicas):
        v = per_replica[p]
        if not v:
            continue
        print(f"  replica {i + 1} (port {p}) round trip{'':<33} {sum(v) / len(v):7.1f} "
              f"{percentile(v, 0.5):7.1f} {percentile(v, 0.99):7.1f}")
    if sched:
        # Every command the job ran, including those the capture missed at its edges: fio's commands are
        # the iSCSI port's command PDUs, counted over the same window as the snapshots.
        print_sched(sched, fio[0] if fio else commands)


if __name__ == "__main__":
    main()
