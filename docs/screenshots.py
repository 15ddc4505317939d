"""Take the README's screenshots of a live run with headless Chromium (Debian's ``chromium``).

    python docs/screenshots.py --dashboard http://127.0.0.1:8265 --token-file TOKEN \\
        --prometheus http://127.0.0.1:9090 --out docs/

Drives Chromium through its DevTools protocol (aiohttp, which Ray installs): the Ray dashboard's
authentication cookie is set from the token first (what typing it into the dashboard's prompt
does), then ``dashboard_actors.png`` (the Actors view) and ``prometheus_metrics.png`` (a few
``ray_rlaif_*`` series in Prometheus' graph view) are written to ``--out``. (The dashboard's
Metrics view needs Grafana as well, which no registry here offers.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

COOKIE = "ray-authentication-token"  # ray._private.authentication.authentication_constants
PROMETHEUS_QUERIES = [
    "ray_rlaif_sampled_accuracy",
    "ray_rlaif_weight_version",
    "rate(ray_rlaif_groups_learned_total[1m])",
]


async def capture(devtools: str, shots: list[tuple[str, Path, float]], cookie: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(devtools, max_msg_size=0) as ws:
        ids = iter(range(1, 1_000_000))

        async def call(method: str, **params: object) -> dict:
            msg_id = next(ids)
            await ws.send_json({"id": msg_id, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == msg_id:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data.get("result", {})
            raise RuntimeError("DevTools connection closed")

        await call(
            "Emulation.setDeviceMetricsOverride", width=1600, height=1400, deviceScaleFactor=1, mobile=False
        )
        if cookie:
            await call("Network.setCookie", **cookie)
        for url, path, wait_s in shots:
            await call("Page.navigate", url=url)
            await asyncio.sleep(wait_s)
            await call("Runtime.evaluate", expression="window.scrollTo(0, 0)")
            shot = await call("Page.captureScreenshot", format="png")
            path.write_bytes(base64.b64decode(shot["data"]))
            print(f"wrote {path} ({url})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265")
    parser.add_argument(
        "--token-file", help="the cluster's token (`ray get-auth-token`); none: auth disabled"
    )
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--wait-s", type=float, default=8.0, help="seconds for each page to render")
    args = parser.parse_args()
    out = Path(args.out)
    graphs = {}
    for i, query in enumerate(PROMETHEUS_QUERIES):
        graphs.update({f"g{i}.expr": query, f"g{i}.tab": "0", f"g{i}.range_input": "5m"})
    shots = [
        (f"{args.dashboard}/#/actors", out / "dashboard_actors.png", args.wait_s),
        (f"{args.prometheus}/graph?{urlencode(graphs)}", out / "prometheus_metrics.png", args.wait_s),
    ]
    cookie = {}
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        cookie = {"name": COOKIE, "value": token, "url": args.dashboard, "httpOnly": True}
    port = 9333
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [
                "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                        pages = [p for p in json.load(r) if p["type"] == "page"]
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            asyncio.run(capture(pages[0]["webSocketDebuggerUrl"], shots, cookie))
        finally:
            browser.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                browser.wait(timeout=10)


if __name__ == "__main__":
    main()
