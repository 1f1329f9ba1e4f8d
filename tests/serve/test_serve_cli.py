"""`edgediff serve` as a user starts it (the README's command, on a free loopback port): ready only after load and
warm-up, serves the openai client, and on SIGTERM finishes the requests in flight, answers them, and exits 0.
Also: a taken port is one line before any model loads, and the CLI imports none of the server stack until asked."""
from __future__ import annotations

import concurrent.futures as cf
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

EDGEDIFF = Path(sys.executable).with_name("edgediff")  # the console script pip installed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)


@pytest.fixture
def edgediff():
    if not EDGEDIFF.is_file():
        pytest.skip(f"no edgediff console script beside {sys.executable} (pip install -e '.[serve]')")
    return str(EDGEDIFF)


def test_readme_command_serves_and_drains_on_sigterm(edgediff):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([edgediff, "serve", "--host", "127.0.0.1", "--port", str(port)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 90, []
        while not any("ready on" in s for s in seen):
            assert proc.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "no 'ready' line within 90 s: " + "".join(seen)
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        assert f"ready on {url}" in seen[-1]
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.images.generate(prompt="a red circle", extra_body={"num_inference_steps": 2}).data[0].b64_json

        with cf.ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(client.images.generate, prompt=p, extra_body={"num_inference_steps": 20, "seed": k})
                     for k, p in enumerate(["a square", "a circle"])]

            def in_flight() -> bool:
                text = httpx.get(url + "/metrics", timeout=10).text
                return 'edgediff_inflight{model="shapes"} 2' in text

            deadline = time.monotonic() + 30
            while not in_flight():
                assert time.monotonic() < deadline, "the two requests never ran together"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)  # while both are being denoised
            results = [c.result(timeout=60) for c in calls]  # drained: answered, not dropped
        assert [r.data[0].seed for r in results] == [0, 1]
        assert proc.wait(timeout=60) == 0
        time.sleep(0.2)
        rest = "".join(seen) + "".join(iter(lambda: lines.get(timeout=1) if not lines.empty() else "", ""))
        assert "stopped" in rest and "Traceback" not in rest
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_taken_port_is_one_line_before_loading(edgediff):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([edgediff, "serve", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "loading" not in r.stderr and "Traceback" not in r.stderr


def test_the_cli_and_the_core_stay_light():
    code = ("import sys, edgediff, edgediff.cli, edgediff.serve; "
            "heavy = [m for m in ('fastapi', 'uvicorn', 'starlette', 'onnxruntime') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-c", "from edgediff.cli import main; main()", "--help"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert "serve" in helped.stdout


def test_lora_options_name_their_model(tmp_path):
    from edgediff.errors import InputError
    from edgediff.serve.cli import _loras_by_model

    f = tmp_path / "style.safetensors"
    f.write_bytes(b"x")
    assert _loras_by_model([f"{f}:0.8"], ["only"]) == {"only": {str(f): 0.8}}
    assert _loras_by_model([f"b={f}"], ["a", "b"]) == {"b": {str(f): 1.0}}
    with pytest.raises(InputError, match=r"name the model it is for as MODEL=FILE\[:WEIGHT\], MODEL one of a, b"):
        _loras_by_model([str(f)], ["a", "b"])
    with pytest.raises(InputError, match="no file"):
        _loras_by_model([f"a={tmp_path / 'nope.safetensors'}"], ["a", "b"])
