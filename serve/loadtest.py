"""A bounded load test for a running ``edgediff serve`` (the lead attaches it as ``edgediff bench serve``):
``concurrency`` clients send ``requests`` OpenAI image requests in all, each a different seed, and the report gives
images/s, latency percentiles of the answered requests, and every failure by kind (HTTP status and error code).

It measures the server as a client sees it, over loopback only: the URL must resolve to a loopback address (this
tool is not for load-testing other machines). It does not measure the server's memory (watch its process), and
latency includes the client's JSON decoding. Stdlib HTTP (one keep-alive connection per client thread), so it needs
nothing beyond the base install.

Accounting: every request sent ends as exactly one of ``ok`` or an error kind (a 429 is ``429 queue_full``, a lost
connection ``connection_error``); ``wrong_seed`` counts answers whose images do not carry the seeds asked for (an
answer given to the wrong request, or twice). ``not_sent`` is what the time cap left unsent.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import click

from edgediff.errors import InputError

PROMPTS = ("a small red circle in the top left corner", "a large blue square in the center",
           "a green triangle at the bottom", "a yellow cross on the right", "a small purple circle",
           "an orange square in the top right corner", "a large green circle", "a gray triangle on a black background")
MAX_REQUESTS = 100_000


@dataclass(frozen=True)
class LoadSpec:
    url: str  # http://127.0.0.1:8000
    concurrency: int = 8
    requests: int = 64
    steps: int | None = None  # None: the model's default
    size: str | None = None  # "WIDTHxHEIGHT"; None: the model's default
    n: int = 1
    model: str | None = None
    api_key: str | None = None
    timeout: float = 600.0  # seconds per request
    max_seconds: float = 1800.0  # stop sending after this long; what is left is reported as not_sent


@dataclass
class LoadReport:
    url: str
    concurrency: int
    requests: int
    sent: int
    ok: int
    images: int
    wall_seconds: float
    images_per_second: float
    latency_seconds: dict[str, float]  # p50, p90, p99, mean, max over answered requests
    errors: dict[str, int] = field(default_factory=dict)  # "429 queue_full": count, "connection_error": count
    wrong_seed: int = 0
    not_sent: int = 0

    def lines(self) -> list[str]:
        lat = self.latency_seconds
        out = [f"{self.url}: {self.sent} requests at concurrency {self.concurrency} in {self.wall_seconds:.2f} s",
               f"  ok {self.ok}, images {self.images}, {self.images_per_second:.3f} images/s",
               "  latency s: " + ", ".join(f"{k} {v:.3f}" for k, v in lat.items()) if lat else "  latency: none"]
        for kind, count in sorted(self.errors.items()):
            out.append(f"  error {kind}: {count}")
        if self.wrong_seed:
            out.append(f"  answers with the wrong seeds: {self.wrong_seed}")
        if self.not_sent:
            out.append(f"  not sent (time cap): {self.not_sent}")
        return out


def check_loopback(url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an http:// URL whose host resolves to loopback addresses only."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InputError(f"URL {url!r}: give http://HOST:PORT of a server on this machine, e.g. http://127.0.0.1:8000")
    try:
        port = parts.port or 80
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)}
    except (OSError, ValueError) as exc:
        raise InputError(f"URL {url!r}: cannot resolve {parts.hostname!r} ({exc})") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise InputError(f"URL {url!r} is not on this machine ({', '.join(sorted(addresses))}): the load test "
                         "only targets loopback addresses (127.0.0.0/8, ::1, localhost)")
    return parts.hostname, port, parts.path.rstrip("/")


def run(spec: LoadSpec) -> LoadReport:
    if not 1 <= spec.requests <= MAX_REQUESTS:
        raise InputError(f"requests={spec.requests}; must be between 1 and {MAX_REQUESTS}")
    if not 1 <= spec.concurrency <= 1024:
        raise InputError(f"concurrency={spec.concurrency}; must be between 1 and 1024")
    host, port, prefix = check_loopback(spec.url)
    next_index = iter(range(spec.requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: Counter = Counter()
    tally = Counter()
    stop_at = time.monotonic() + spec.max_seconds

    def body(i: int) -> bytes:
        b = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i * spec.n, "n": spec.n}
        for key, value in (("num_inference_steps", spec.steps), ("size", spec.size), ("model", spec.model)):
            if value is not None:
                b[key] = value
        return json.dumps(b).encode()

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=spec.timeout)
        headers = {"Content-Type": "application/json"}
        if spec.api_key:
            headers["Authorization"] = f"Bearer {spec.api_key}"
        try:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(next_index, None)
                    if i is not None:
                        tally["sent"] += 1
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    conn.request("POST", prefix + "/v1/images/generations", body=body(i), headers=headers)
                    resp = conn.getresponse()
                    raw = resp.read()
                except (OSError, http.client.HTTPException):
                    with lock:
                        errors["connection_error"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=spec.timeout)
                    continue
                seconds = time.perf_counter() - t0
                kind, images, seeds = _outcome(resp.status, raw)
                with lock:
                    if kind is not None:
                        errors[kind] += 1
                        continue
                    latencies.append(seconds)
                    tally["ok"] += 1
                    tally["images"] += images
                    if seeds != [1000 + i * spec.n + k for k in range(spec.n)]:
                        tally["wrong_seed"] += 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(spec.concurrency) as pool:
        for f in [pool.submit(client) for _ in range(spec.concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    return LoadReport(url=spec.url, concurrency=spec.concurrency, requests=spec.requests, sent=tally["sent"],
                      ok=tally["ok"], images=tally["images"], wall_seconds=round(wall, 4),
                      images_per_second=round(tally["images"] / wall, 4) if wall > 0 else 0.0,
                      latency_seconds=percentiles(latencies), errors=dict(errors), wrong_seed=tally["wrong_seed"],
                      not_sent=spec.requests - tally["sent"])


def _outcome(status: int, raw: bytes) -> tuple[str | None, int, list]:
    """(error kind or None, images, seeds) of one answer."""
    try:
        data = json.loads(raw)
    except ValueError:
        return f"{status} not_json", 0, []
    if status != 200:
        code = (data.get("error") or {}).get("code") if isinstance(data, dict) else None
        return f"{status} {code or 'error'}", 0, []
    items = data.get("data") or []
    return None, len(items), [d.get("seed") for d in items]


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 (the value below which that share of answers fell), mean and max."""
    if not values:
        return {}
    v = sorted(values)

    def rank(p: float) -> float:
        return v[min(len(v) - 1, max(0, int(-(-p * len(v) // 100)) - 1))]

    return {"p50": round(rank(50), 4), "p90": round(rank(90), 4), "p99": round(rank(99), 4),
            "mean": round(sum(v) / len(v), 4), "max": round(v[-1], 4)}


@click.command("serve")
@click.argument("url")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=8, show_default=True, help="Clients at once.")
@click.option("--requests", type=click.IntRange(1, MAX_REQUESTS), default=64, show_default=True,
              help="Requests in all.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Default: the model's.")
@click.option("--size", default=None, help="WIDTHxHEIGHT (default: the model's).")
@click.option("--n", type=click.IntRange(1, 64), default=1, show_default=True, help="Images per request.")
@click.option("--model", default=None, help="Default: the server's first model.")
@click.option("--api-key", envvar="EDGEDIFF_API_KEY", default=None)
@click.option("--max-seconds", type=click.FloatRange(min=1), default=1800.0, show_default=True,
              help="Stop sending after this long.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_serve(url, concurrency, requests, steps, size, n, model, api_key, max_seconds, as_json) -> None:
    """Load-test a running `edgediff serve` at URL (loopback only): images/s, latency p50/p90/p99, errors by kind."""
    report = run(LoadSpec(url=url, concurrency=concurrency, requests=requests, steps=steps, size=size, n=n,
                          model=model, api_key=api_key, max_seconds=max_seconds))
    click.echo(json.dumps(asdict(report), indent=2) if as_json else "\n".join(report.lines()))


def main(argv: list[str] | None = None) -> None:
    """``python -m edgediff.serve.loadtest URL ...``: the same command outside the edgediff CLI."""
    try:
        bench_serve.main(argv, prog_name="python -m edgediff.serve.loadtest", standalone_mode=False)
    except InputError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
