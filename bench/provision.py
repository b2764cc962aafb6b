"""Provisioning benchmark: simulated provisioning-mode nodes against a real provisioner.

A provisioner (its own process, the built-in helper signing with a throwaway
CA) serves N simulated nodes run as coroutines in a few processes. Each node
does what a real one does on the wire: TLS to the provisioner, announce with
the token, answer inventory, make a P-256 key and CSR (gencsr), take the
certificate and configuration (configure), and acknowledge restart. It does
not restart into a cluster: "joined" here is the restart, as no server runs.
Prints nodes per minute, p50/p95 of announce-to-restart, and the CPU the
provisioner spent per node.

    python bench/provision.py [--nodes 2000] [--processes 2] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from directord.protocol import FrameDecoder, frame
from directord.protocol.provisioning import FROM_PROVISIONER, Announce, Answer, Ask, Refused
from directord.security.pki import PKI

TOKEN = "bench-token-0123456789"
TICK = os.sysconf("SC_CLK_TCK")


def csr_for(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


async def one_node(name: str, port: int, tls: ssl.SSLContext) -> float:
    """Provision one simulated node; returns seconds from announce to restart."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    started = time.perf_counter()
    writer.write(frame([Announce(identity=name, machine_id=f"m-{name}", token=TOKEN)]))
    await writer.drain()
    decoder = FrameDecoder(FROM_PROVISIONER)
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError(f"{name}: the provisioner closed")
            for batch in decoder.feed(data):
                for message in batch:
                    if isinstance(message, Refused):
                        raise RuntimeError(f"{name}: refused: {message.reason}")
                    assert isinstance(message, Ask)
                    result: object = {}
                    if message.method == "inventory":
                        result = {
                            "identity": name,
                            "machine_id": f"m-{name}",
                            "facts": {"cpus": 2},
                            "pki_dir": "/etc/directord/pki",
                        }
                    elif message.method == "gencsr":
                        result = {"csr": csr_for(name)}
                    writer.write(frame([Answer(rid=message.rid, ok=True, result=result)]))
                    await writer.drain()
                    if message.method == "restart":
                        return time.perf_counter() - started
    finally:
        writer.close()


async def many(names: list[str], port: int, ca: str, concurrency: int) -> list[float]:
    tls = ssl.create_default_context(cafile=ca)
    gate = asyncio.Semaphore(concurrency)

    async def bounded(name: str) -> float:
        async with gate:
            return await one_node(name, port, tls)

    return list(await asyncio.gather(*(bounded(n) for n in names)))


def worker(names: list[str], port: int, ca: str, concurrency: int, out: str) -> None:
    times = asyncio.run(many(names, port, ca, concurrency))
    Path(out).write_text(json.dumps(times))


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=200, help="connections per process")
    parser.add_argument("--workers", type=int, default=16, help="provisioner workers")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="directord-provision-bench-"))
    pki = PKI(str(root / "ca"))
    pki.init()
    cert, key = pki.issue("provisioner", ["127.0.0.1"], "server")
    ready = root / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRECTORD_")}
    (root / "config.yaml").write_text("{}\n")
    provisioner = subprocess.Popen(
        [
            sys.executable, "-m", "directord", "--config-file", str(root / "config.yaml"),
            "--socket-path", str(root / "no-server.sock"), "provisioner",
            "--provisioning-token", TOKEN, "--provisioning-bind", "127.0.0.1",
            "--provisioning-port", "0", "--provisioning-ssl-cert", str(cert),
            "--provisioning-ssl-key", str(key), "--pki-dir", str(root / "ca"),
            "--provisioner-socket", str(root / "control.sock"),
            "--provisioner-state", str(root / "state"),
            "--provisioner-workers", str(args.workers), "--ready-file", str(ready),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not ready.exists():
            if provisioner.poll() is not None:
                raise SystemExit("the provisioner did not start")
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        names = [f"sim{i:06d}" for i in range(args.nodes)]
        chunks = [names[i :: args.processes] for i in range(args.processes)]
        cpu_before = cpu(provisioner.pid)
        started = time.perf_counter()
        procs = []
        for i, chunk in enumerate(chunks):
            out = str(root / f"times-{i}.json")
            p = multiprocessing.Process(
                target=worker, args=(chunk, port, str(pki.ca_cert_path), args.concurrency, out)
            )
            p.start()
            procs.append((p, out))
        times: list[float] = []
        for p, out in procs:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"a node process failed (exit {p.exitcode})")
            times += json.loads(Path(out).read_text())
        wall = time.perf_counter() - started
        cpu_used = cpu(provisioner.pid) - cpu_before
    finally:
        provisioner.terminate()
        provisioner.wait(10)
    times.sort()
    q = statistics.quantiles(times, n=20)
    print(f"nodes:              {len(times)} ({args.processes} processes, "
          f"{args.concurrency} connections each, {args.workers} provisioner workers)")  # fmt: skip
    print(f"wall:               {wall:.1f} s")
    print(f"nodes per minute:   {len(times) / wall * 60:.0f}")
    print(f"announce->restart:  p50 {statistics.median(times) * 1000:.0f} ms, "
          f"p95 {q[18] * 1000:.0f} ms")  # fmt: skip
    print(f"provisioner CPU:    {cpu_used / len(times) * 1000:.2f} ms per node")
    print(f"machine:            {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
