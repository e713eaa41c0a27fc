"""Screenshot a page of the Ray dashboard as a signed-in user sees it, with headless Chromium
(Debian's `chromium` package) driven over the DevTools protocol: sign in the way the dashboard's
token dialog does (POST /api/authenticate with the Ray token, which sets its cookie), open the
page, wait for it to render, capture it. Made docs/ray-dashboard-actors.png during a job:

    .venv/bin/python docs/screenshot.py --dashboard http://127.0.0.1:8265 --page '#/actors' \
        --out docs/ray-dashboard-actors.png
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp


def ray_token() -> str:
    ray = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "ray"
    return subprocess.run([str(ray), "get-auth-token"], capture_output=True, text=True, check=True).stdout.strip()


class Page:
    """One browser tab over the DevTools websocket: call(method, **params) -> result."""

    def __init__(self, ws) -> None:
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        await self.ws.send_json({"id": message_id, "method": method, "params": params})
        async for message in self.ws:
            reply = json.loads(message.data)
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise RuntimeError("the browser closed the connection")


async def capture(debug_port: int, dashboard: str, page: str, token: str, out: Path, wait_s: float) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{debug_port}/json/new?about:blank") as r:
            target = await r.json()
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = Page(ws)
            await tab.call(
                "Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False
            )
            await tab.call("Page.navigate", url=dashboard)
            await asyncio.sleep(2)
            headers = json.dumps({"Authorization": f"Bearer {token}"})
            sign_in = f"fetch('/api/authenticate', {{method: 'POST', headers: {headers}}}).then(r => r.status)"
            status = await tab.call("Runtime.evaluate", expression=sign_in, awaitPromise=True)
            if status["result"].get("value") != 200:
                raise RuntimeError(f"the dashboard refused the token: {status}")
            await tab.call("Page.navigate", url=f"{dashboard}/{page}")
            await tab.call("Page.reload")  # a hash route alone does not reload: the token dialog would stay
            await asyncio.sleep(wait_s)
            shot = await tab.call("Page.captureScreenshot", format="png")
    out.write_bytes(base64.b64decode(shot["data"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dashboard", default="http://127.0.0.1:8265")
    ap.add_argument("--page", default="#/actors")
    ap.add_argument("--out", type=Path, default=Path("docs/ray-dashboard-actors.png"))
    ap.add_argument("--wait-s", type=float, default=8.0)
    ap.add_argument("--debug-port", type=int, default=9333)
    args = ap.parse_args()
    browser = shutil.which("chromium") or "chromium"
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={args.debug_port}"]
        proc = subprocess.Popen([*cmd, f"--user-data-dir={profile}"], stderr=subprocess.DEVNULL)
        try:
            for _ in range(60):  # the DevTools endpoint answers once the browser is up
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{args.debug_port}/json/version", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
            asyncio.run(capture(args.debug_port, args.dashboard, args.page, ray_token(), args.out, args.wait_s))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
