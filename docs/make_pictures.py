"""Re-make every picture under docs/ from the code as it is, and record how in docs/pictures.json.

    python docs/make_pictures.py                   # everything: about 15 minutes on a busy 2-core machine
    python docs/make_pictures.py --only tensorboard_images.png tensorboard_scalars.png

What it runs (from the repository root, in this Python environment):

1. the README's first command, the main example at its defaults (``python examples/train_vit.py``), with its
   logs under ``--workdir`` instead of ``runs/``; its GradToken timeline becomes ``docs/timeline_gradtoken.png``;
2. TensorBoard on those logs with exactly the README's command (``demos.cli.tensorboard_command``, plus a port),
   and headless Chromium (``apt-get install chromium``) at 1600 px width for the screenshots of its Images, Time
   Series, Scalars and Custom Scalars tabs (``docs/tensorboard_*.png``), driven through the DevTools protocol so
   that it waits for the lazily loaded cards (``pip install -e ".[docs]"`` for its websocket client, aiohttp);
3. the shortcut example (``examples/shortcut.py``), which writes ``docs/shortcut_timeline.png`` itself.

The manifest holds, per picture, the SHA-256 of its generator (the command and options below, see
:func:`generator_hash`) and of the picture file: ``tests/test_pictures.py`` fails when a generator changed but its
picture was not re-made, when a picture was replaced by hand, and when a picture is not in the manifest.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MANIFEST = DOCS / "pictures.json"
WIDTH = 1600  # the browser window's width, in CSS pixels (device scale 1)
MAIN_EXAMPLE = ["examples/train_vit.py"]  # at its defaults; only --output-dir is added
SHORTCUT_EXAMPLE = ["examples/shortcut.py"]
RUN_NAME = "texture-vit_tiny_patch16_224"  # the main example's run folder at its defaults


@dataclass(frozen=True)
class Screenshot:
    """One TensorBoard page: ``query`` and ``fragment`` of its URL, the window height, the seconds waited for the
    cards to load, and JavaScript run before the screenshot (e.g. to close the settings pane)."""

    query: str
    fragment: str
    height: int = 1200
    wait: float = 20.0
    script: str = ""


@dataclass(frozen=True)
class Picture:
    """How one docs/ picture is made: ``kind`` is ``"main"`` (a file the main example writes, ``source`` relative
    to its run folder), ``"tensorboard"`` (``screenshot``) or ``"shortcut"`` (the shortcut example's own output)."""

    kind: str
    command: tuple[str, ...] = ()
    source: str = ""
    screenshot: Screenshot | None = None
    options: dict = field(default_factory=dict)


#: Closes Time Series' settings pane, which would take a fifth of the width.
CLOSE_SETTINGS = ("for (const b of document.querySelectorAll('button')) {"
                  " if ((b.getAttribute('aria-label') || '').toLowerCase().includes('close')) b.click(); }")

PICTURES: dict[str, Picture] = {
    "timeline_gradtoken.png": Picture("main", tuple(MAIN_EXAMPLE), source="xai/timeline_gradtoken.png"),
    "tensorboard_images.png": Picture("tensorboard", tuple(MAIN_EXAMPLE), screenshot=Screenshot(
        "", "images&tagFilter=gradtoken%2F(overlay%7Ctimeline)%2F%5B0-2%5D%24", height=1500)),
    "tensorboard_time_series.png": Picture("tensorboard", tuple(MAIN_EXAMPLE), screenshot=Screenshot(
        "tagFilter=gradtoken%2Foverlay", "timeseries", height=1300, script=CLOSE_SETTINGS)),
    "tensorboard_scalars.png": Picture("tensorboard", tuple(MAIN_EXAMPLE), screenshot=Screenshot(
        "", "scalars&tagFilter=xai%2Fgradtoken", height=1100)),
    "tensorboard_custom_scalars.png": Picture("tensorboard", tuple(MAIN_EXAMPLE), screenshot=Screenshot(
        "", "custom_scalars", height=1300)),
    "shortcut_timeline.png": Picture("shortcut", tuple(SHORTCUT_EXAMPLE), options={"--timeline": "<picture>"}),
}


def generator_hash(name: str) -> str:
    """SHA-256 of how picture ``name`` is made: its :class:`Picture` (command, options, screenshot settings), the
    window width and, for screenshots, the README's TensorBoard command."""
    from lightning_xai.demos.cli import tensorboard_command

    picture = PICTURES[name]
    described = {"picture": asdict(picture), "width": WIDTH}
    if picture.kind == "tensorboard":
        described["tensorboard"] = tensorboard_command("<logdir>")
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(command: list[str], log: Path) -> None:
    """Run ``python <command>`` from the repository root, its output to ``log``; raise when it fails."""
    print(f"$ python {' '.join(command)}   (output: {log})", flush=True)
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"error: python {' '.join(command)} failed ({done.returncode}); see {log}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200 and json.loads(response.read()):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: {url} did not answer within {seconds} s")


async def _capture(browser_port: int, url: str, shot: Screenshot, path: Path) -> None:
    """Open ``url`` in the running Chromium, wait, run ``shot.script``, save a ``WIDTH`` x ``shot.height``
    screenshot to ``path``."""
    import aiohttp

    request = urllib.request.Request(f"http://127.0.0.1:{browser_port}/json/new?about:blank", method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        page = json.loads(response.read())
    async with aiohttp.ClientSession() as session, session.ws_connect(page["webSocketDebuggerUrl"],
                                                                      max_msg_size=0) as socket_:
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            await socket_.send_json({"id": counter, "method": method, "params": params})
            async for message in socket_:
                data = json.loads(message.data)
                if data.get("id") == counter:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data.get("result", {})
            raise RuntimeError(f"Chromium closed the connection during {method}")

        await call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=shot.height, deviceScaleFactor=1,
                   mobile=False)
        await call("Page.navigate", url=url)
        await asyncio.sleep(shot.wait)
        if shot.script:
            await call("Runtime.evaluate", expression=shot.script)
            await asyncio.sleep(3)
        result = await call("Page.captureScreenshot", format="png")
    path.write_bytes(base64.b64decode(result["data"]))


def screenshots(logdir: Path, names: list[str], workdir: Path) -> None:
    """Start TensorBoard on ``logdir`` as the README says and Chromium, and take the screenshots ``names``."""
    from lightning_xai.demos.cli import tensorboard_command

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("error: no Chromium found: apt-get install -y chromium (or put chrome on PATH)")
    port, browser_port = free_port(), free_port()
    command = tensorboard_command(logdir).split()
    print(f"$ {' '.join(command)} --port {port}", flush=True)
    tensorboard = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", *command[1:], "--port", str(port), "--host", "127.0.0.1"],
        stdout=(workdir / "tensorboard.log").open("w"), stderr=subprocess.STDOUT)
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={WIDTH},1200",
         f"--remote-debugging-port={browser_port}", f"--user-data-dir={workdir / 'chromium'}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/data/plugin/images/tags")
        wait_for(f"http://127.0.0.1:{browser_port}/json/version")
        for name in names:
            shot = PICTURES[name].screenshot
            query = f"?{shot.query}" if shot.query else ""
            url = f"http://127.0.0.1:{port}/{query}#{shot.fragment}"
            print(f"screenshot {url} -> docs/{name}", flush=True)
            asyncio.run(_capture(browser_port, url, shot, DOCS / name))
    finally:
        for process in (browser, tensorboard):
            process.terminate()
            process.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(PICTURES), default=None,
                        help="re-make only these pictures (default: all)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "pictures"),
                        help="where the examples' logs go (replaced)")
    args = parser.parse_args(argv)
    names = args.only or list(PICTURES)
    workdir = Path(args.workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    if any(PICTURES[name].kind in ("main", "tensorboard") for name in names):
        run([*MAIN_EXAMPLE, "--output-dir", str(workdir / "main")], workdir / "main.log")
        run_dir = workdir / "main" / RUN_NAME / "version_0"
        for name in names:
            if PICTURES[name].kind == "main":
                shutil.copyfile(run_dir / PICTURES[name].source, DOCS / name)
        shots = [name for name in names if PICTURES[name].kind == "tensorboard"]
        if shots:
            screenshots(workdir / "main", shots, workdir)
    for name in names:
        if PICTURES[name].kind == "shortcut":
            options = [value.replace("<picture>", str(DOCS / name)) for pair in PICTURES[name].options.items()
                       for value in pair]
            run([*SHORTCUT_EXAMPLE, "--out", str(workdir / "shortcut"), *options], workdir / "shortcut.log")

    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    for name in names:
        manifest[name] = {"generator": generator_hash(name), "picture": file_hash(DOCS / name)}
    MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    for name in names:
        print(f"wrote {DOCS / name}")
    print(f"wrote {MANIFEST}")


if __name__ == "__main__":
    main()
