"""Every start-up error a newcomer meets is one line on stderr saying what to do, exit status 1, no traceback.

A missing extra is simulated the way Python sees an uninstalled package: the module is made unimportable
(`sys.modules[name] = None`, which `importlib.util.find_spec` reports as absent) in the real CLI process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scholarembed import Client, ScholarEmbedError


def serve(*args: str, without: tuple[str, ...] = (), log_level: str = "INFO") -> subprocess.CompletedProcess[str]:
    """`scholarembed serve ARGS` in its own process, with the modules `without` uninstalled as far as it can see."""
    code = (
        "import sys\n"
        f"for name in {without!r}: sys.modules[name] = None\n"
        "from scholarembed_server.cli import main\n"
        f"sys.exit(main(['--log-level', {log_level!r}, 'serve', *{list(args)!r}]))\n"
    )
    quiet = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # transformers' weight-loading bar, if it loads
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=quiet)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("scholarembed serve: error: ")
    return lines[0]


@pytest.fixture
def taken_port() -> int:
    """A loopback port some other program is listening on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize(
    ("flag", "door", "advice"),
    [
        ("--port", "gRPC", "--port"),
        ("--http-port", "HTTP", "--http-port (or --no-http)"),
        ("--metrics-port", "metrics", "--metrics-port (or --no-metrics)"),
    ],
)
def test_a_port_in_use_names_the_port_and_the_flag_before_the_model_loads(taken_port, flag, door, advice) -> None:
    free = {"--port": "0", "--http-port": "0", "--metrics-port": "0"} | {flag: str(taken_port)}
    # A model that does not exist: the port is refused before any model is looked for.
    result = serve("--model", "/no/such/model", *(part for item in free.items() for part in item), "--no-index")
    line = one_line_error(result)
    assert f"cannot serve {door} on 127.0.0.1:{taken_port}" in line
    assert f"choose another port with {advice}" in line


@pytest.mark.parametrize(
    ("without", "args", "extra"),
    [
        (("torch",), (), "server"),
        (("uvicorn",), (), "http"),
        (("fastapi",), (), "http"),
        (("milvus_lite",), ("--index-uri", "papers.db"), "milvus"),
        (("pymilvus",), ("--index-uri", "http://milvus.internal:19530"), "milvus"),
    ],
)
def test_a_missing_extra_names_its_pip_install_before_the_model_loads(tmp_path, without, args, extra) -> None:
    result = serve("--model", "/no/such/model", "--data-dir", str(tmp_path), *args, without=without)
    line = one_line_error(result)
    assert f"needs {without[0]}: pip install 'scholarembed[{extra}]'" in line
    assert "/no/such/model" not in line  # checked before the model was looked for


def test_the_http_door_turned_off_needs_no_http_extra(tmp_path) -> None:
    result = serve("--model", str(tmp_path / "empty"), "--port", "0", "--metrics-port", "0", "--no-http",
                   without=("uvicorn", "fastapi"))  # fmt: skip
    assert "scholarembed[http]" not in one_line_error(result)  # it got as far as the model


def test_a_model_folder_without_a_config_says_what_a_model_folder_holds(tmp_path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    line = one_line_error(serve("--model", str(folder), "--port", "0", "--no-http", "--no-metrics", "--no-index"))
    assert f"{folder} has no config.json" in line and "save_pretrained" in line


def test_a_model_that_is_neither_a_folder_nor_in_the_cache_says_so(tmp_path) -> None:
    line = one_line_error(serve("--model", "nobody/no-such-model", "--port", "0", "--no-http", "--no-metrics"))
    assert "'nobody/no-such-model' could not be loaded" in line and "HF_HUB_OFFLINE" in line


def test_search_on_a_server_without_a_store_names_the_flags_that_enable_it(tmp_path, in_process_server) -> None:
    server = in_process_server()  # no data_dir, no index_uri: what --no-index serves
    corpus = Path(__file__).parents[1] / "examples" / "papers.jsonl"
    index = subprocess.run(
        [sys.executable, "-m", "scholarembed_server", "index", "--corpus", str(corpus), "--collection", "papers",
         "--server", server.address, "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert index.returncode == 1 and "Traceback" not in index.stderr
    [line] = index.stderr.splitlines()
    assert line.startswith("scholarembed index: error: UNIMPLEMENTED: search is not enabled on this server")
    assert "--data-dir" in line and "--index-uri" in line and "--no-index" in line
    with Client(server.address) as client:  # every SearchService method says the same
        for call in (
            lambda: client.search("protein", collection="papers"),
            lambda: client.list_collections(),
            lambda: list(client.search_stream(iter(["protein"]), collection="papers")),
        ):
            with pytest.raises(ScholarEmbedError, match=r"start.*--data-dir DIR or --index-uri URI") as raised:
                call()
            assert raised.value.code.name == "UNIMPLEMENTED"
        assert client.embed_queries(["protein"]).shape[0] == 1  # and embeddings are served


def test_the_banner_of_a_server_without_a_store_offers_a_command_that_works(in_process_server) -> None:
    server = in_process_server()
    banner = server.server.banner()
    assert "store    none (--no-index): embeddings only" in banner
    assert banner.splitlines()[-1].split() == ["try", "scholarembed", "info", "--server", server.address]


def test_a_store_another_server_holds_says_which_flag_gives_this_one_its_own(tmp_path, tiny_model_dir) -> None:
    from scholarembed_server.index.embedded import EmbeddedIndex

    held = EmbeddedIndex(tmp_path / "data")  # as a running server holds it
    try:
        # The store is opened once the model has loaded: its log lines are left out, the error is not.
        result = serve("--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"),
                       "--port", "0", "--http-port", "0", "--metrics-port", "0", log_level="ERROR")  # fmt: skip
    finally:
        held.close()
    line = one_line_error(result)
    assert "is in use by another process" in line and "--data-dir" in line


def test_compile_opens_no_door_so_it_needs_no_http_extra(tmp_path) -> None:
    code = (
        "import sys\n"
        "sys.modules['uvicorn'] = None\n"
        "from scholarembed_server.cli import main\n"
        f"sys.exit(main(['compile', '--model', {str(tmp_path / 'none')!r}, '--output', {str(tmp_path)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("scholarembed compile: error: model") and "scholarembed[http]" not in line
