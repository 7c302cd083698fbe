"""`scholarembed serve` with no flag serves the whole product: gRPC, the HTTP door with its search page,
metrics, and the embedded store in the default data folder; its banner's first command works as printed.

The only flags are the ones a test needs to stay isolated: free ports (`0`) and a port file. HOME is a
temporary folder, so the default data folder ($HOME/.local/share/scholarembed) and the Hugging Face cache
are the test's own. The default model cannot be downloaded here, so the tiny EmbeddingGemma-shaped model
is put in that cache under the default model's id, as a hub download leaves it: `serve` resolves its
default `--model` exactly as it does on a machine that has fetched the real weights.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import START_TIMEOUT_S, wait_serving

from scholarembed import Client
from scholarembed_server.config import DEFAULT_MODEL

REPO = Path(__file__).parents[1]
COMMIT = "0" * 40  # the snapshot's name: a hub commit id


def hub_cache_with_the_default_model(home: Path, model_dir: Path) -> None:
    """The layout huggingface_hub leaves after downloading DEFAULT_MODEL at commit COMMIT."""
    repo = home / ".cache" / "huggingface" / "hub" / f"models--{DEFAULT_MODEL.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_serve_with_no_flag_indexes_and_searches(tmp_path, tiny_model_dir) -> None:
    home = tmp_path / "home"
    hub_cache_with_the_default_model(home, tiny_model_dir)
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SCHOLAREMBED_", "HF_", "XDG_")) and name != "HOME"
    } | {"HOME": str(home), "HF_HUB_OFFLINE": "1"}
    port_file = tmp_path / "port"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "scholarembed_server", "serve",
             "--port", "0", "--http-port", "0", "--metrics-port", "0", "--port-file", str(port_file)],
            stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text()):
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
        wait_serving(address, process=server)
        output = log_path.read_text()

        # The banner: every address, the store's folder, and one command to try.
        data_dir = home / ".local" / "share" / "scholarembed"
        assert f"serving {DEFAULT_MODEL} on {address}" in output
        assert re.search(rf"gRPC +{re.escape(address)} +EmbeddingService, SearchService, health, reflection", output)
        http_url = re.search(r"HTTP +(http://127\.0\.0\.1:\d+)/ +search page", output).group(1)
        metrics_url = re.search(r"metrics +(http://127\.0\.0\.1:\d+/metrics)", output).group(1)
        assert f"store    {data_dir} (0 collections)" in output
        first_command = re.search(r"try +(scholarembed index .*)", output).group(1)
        assert shlex.split(first_command) == [
            "scholarembed", "index", "--corpus", "examples/papers.jsonl", "--collection", "papers",
            "--server", address,
        ]  # fmt: skip

        # The first command, exactly as printed, then the search it suggests.
        cli = [sys.executable, "-m", "scholarembed_server"]
        index = subprocess.run(
            [*cli, *shlex.split(first_command)[1:], "--no-progress"],
            capture_output=True, text=True, timeout=300, env=environment, cwd=REPO, check=True,
        )  # fmt: skip
        assert "upserted 12; 'papers' holds 12 passages" in index.stderr
        suggested = re.search(r"search it: (scholarembed search .*)", index.stderr).group(1)
        search_args = [("CRISPR off-target cleavage" if a == "your question" else a) for a in shlex.split(suggested)]
        search = subprocess.run(
            [*cli, *search_args[1:]], capture_output=True, text=True, timeout=120, env=environment, check=True
        )
        printed = [row.split()[2] for row in search.stdout.splitlines()[1:]]  # the table shows 16 characters of ids
        assert len(printed) == 10

        # The store is in the default data folder; the model is the default one; every door serves.
        assert (data_dir / "papers").is_dir()
        with Client(address) as client:
            assert client.model_info().model_id == DEFAULT_MODEL
            hits = client.search("CRISPR off-target cleavage", collection="papers", top_k=10)
            assert [hit.id[:16] for hit in hits] == printed
        page = urllib.request.urlopen(http_url + "/", timeout=30)
        assert page.headers["Content-Type"].startswith("text/html") and b"scholarembed search" in page.read()
        body = json.dumps({"collection": "papers", "queries": ["CRISPR off-target cleavage"], "top_k": 10}).encode()
        http_search = urllib.request.Request(http_url + "/v1/search", body, {"Content-Type": "application/json"})
        http_hits = json.load(urllib.request.urlopen(http_search, timeout=30))["results"][0]["hits"]
        assert [hit["id"] for hit in http_hits] == [hit.id for hit in hits]
        metrics = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
        assert 'scholarembed_index_passages{collection="papers"} 12.0' in metrics
    finally:
        server.terminate()
        assert server.wait(60) == 0, log_path.read_text()
