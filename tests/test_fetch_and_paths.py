"""Fetching and paths (issue 18, item 4): image URLs get timeouts, a byte cap and no requests to internal
addresses (redirect hops included), with opt-out switches; data paths stay inside the image root.

Every server here is local (http.server on 127.0.0.1 or 127.0.0.2, in a thread): the positive cases need
``TTE_FLASH_ALLOW_PRIVATE_URLS=1`` (and ``TTE_FLASH_OFFLINE=0``: conftest sets ``HF_HUB_OFFLINE=1``), and the
default is checked to refuse them."""
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from tte_flash import fetch
from tte_flash.data import eval_example, make_input, resolve_media, train_example
from tte_flash.fetch import FetchError, FetchPolicy, address_problem, fetch_url
from tte_flash.media import load_image

ALLOW = FetchPolicy(allow_private=True)


def png_bytes(colour=(200, 30, 90), size=(23, 17)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """A local HTTP server in a thread; ``routes`` maps a path to a handler(request) and ``hits`` counts
    requests per path. ``stop`` releases handlers that wait on it."""

    def __init__(self, routes: dict, host: str = "127.0.0.1"):
        self.routes, self.hits, self.stop = routes, {}, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "no such thing")
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send(request, body: bytes, status=200, headers=None):
    request.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        request.send_header(name, value)
    request.end_headers()
    request.wfile.write(body)


def redirect(location):
    return lambda request: send(request, b"", 302, {"Location": location})


@pytest.fixture
def server():
    servers = []

    def start(routes, host="127.0.0.1"):
        servers.append(Server(routes, host))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


@pytest.fixture
def online(monkeypatch):
    """URL fetching on (conftest sets HF_HUB_OFFLINE=1), default limits, no private addresses."""
    for name in ("TTE_FLASH_ALLOW_PRIVATE_URLS", "TTE_FLASH_URL_TIMEOUT", "TTE_FLASH_URL_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TTE_FLASH_OFFLINE", "0")
    return monkeypatch


def test_default_refuses_loopback_and_fetches_nothing(server, online):
    """127.0.0.1 and localhost (checked after resolution) are refused before any request is sent."""
    site = server({"/img.png": lambda r: send(r, png_bytes())})
    for url in (f"{site.url}/img.png", site.url.replace("127.0.0.1", "localhost") + "/img.png"):
        with pytest.raises(FetchError, match="loopback") as caught:
            load_image(url)
        assert url in str(caught.value) and "TTE_FLASH_ALLOW_PRIVATE_URLS" in str(caught.value)
    assert site.hits == {}


def test_allowed_url_is_fetched_and_decoded(server, online):
    site = server({"/img.png": lambda r: send(r, png_bytes())})
    online.setenv("TTE_FLASH_ALLOW_PRIVATE_URLS", "1")
    image = load_image(f"{site.url}/img.png")
    assert image.size == (23, 17) and image.getpixel((3, 4)) == (200, 30, 90)
    assert site.hits == {"/img.png": 1}


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"),
    ("172.16.5.4", "private"), ("192.168.0.1", "private"), ("fd00::1", "private"), ("169.254.169.254", "link-local"),
    ("fe80::1%eth0", "link-local"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("0.0.0.0", "unspecified"), ("100.64.0.1", "non-public"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
    ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None)])
def test_address_classification(address, kind):
    problem = address_problem(address)
    assert (problem is None) if kind is None else (kind in problem)


def test_every_redirect_hop_is_checked(server, online):
    """A public-looking first hop (127.0.0.1 treated as public here) that redirects to an internal address
    (127.0.0.2, another local service) is refused at the redirect, and the internal service sees no request;
    with the opt-out the redirect is followed."""
    inner = server({"/secret.png": lambda r: send(r, png_bytes((1, 2, 3)))}, host="127.0.0.2")
    outer = server({"/img.png": redirect(f"{inner.url}/secret.png")})
    real = address_problem
    online.setattr(fetch, "address_problem", lambda a: None if a == "127.0.0.1" else real(a))
    with pytest.raises(FetchError, match="loopback") as caught:
        fetch_url(f"{outer.url}/img.png")
    assert f"redirected to {inner.url}/secret.png" in str(caught.value)
    assert outer.hits == {"/img.png": 1} and inner.hits == {}
    online.setenv("TTE_FLASH_ALLOW_PRIVATE_URLS", "1")
    assert load_image(f"{outer.url}/img.png").getpixel((0, 0)) == (1, 2, 3) and inner.hits == {"/secret.png": 1}


def test_redirect_loop_and_http_errors_name_the_url(server):
    site = server({"/loop": redirect("/loop"), "/gone": lambda r: send(r, b"no", 410),
                   "/nowhere": lambda r: send(r, b"", 302)})
    with pytest.raises(FetchError, match=r"more than 5 redirects"):
        fetch_url(f"{site.url}/loop", ALLOW)
    assert site.hits["/loop"] == 6
    with pytest.raises(FetchError, match=rf"cannot fetch {site.url}/gone: HTTP 410"):
        fetch_url(f"{site.url}/gone", ALLOW)
    with pytest.raises(FetchError, match="without a Location header"):
        fetch_url(f"{site.url}/nowhere", ALLOW)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(f"{site.url}/missing", ALLOW)


def test_a_silent_server_times_out(server):
    """Headers that never come: the fetch stops after the timeout, naming the URL."""
    site = server({"/silent": lambda r: site.stop.wait(30)})
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out") as caught:
        fetch_url(f"{site.url}/silent", FetchPolicy(allow_private=True, timeout=0.5))
    assert time.monotonic() - start < 5 and f"{site.url}/silent" in str(caught.value)


def test_a_dripping_body_hits_the_total_timeout(server):
    """One byte every 0.1 s never trips the read timeout; the whole fetch's deadline stops it."""
    def drip(request):
        request.send_response(200)
        request.send_header("Content-Length", "100000")
        request.end_headers()
        while not site.stop.wait(0.1):
            request.wfile.write(b"x")
            request.wfile.flush()
    site = server({"/drip": drip})
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_url(f"{site.url}/drip", FetchPolicy(allow_private=True, timeout=1.0, total_timeout=1.5))
    assert time.monotonic() - start < 5


def test_an_endless_body_stops_at_the_cap(server, online):
    """A body without a length that never ends is cut at the cap, quickly; a declared length over the cap is
    refused before reading; the cap comes from TTE_FLASH_URL_MAX_BYTES too."""
    def endless(request):
        request.send_response(200)
        request.send_header("Connection", "close")
        request.end_headers()
        chunk = b"\0" * 65536
        while not site.stop.is_set():
            request.wfile.write(chunk)

    def declared(request):
        request.send_response(200)
        request.send_header("Content-Length", str(10**10))
        request.end_headers()
    site = server({"/endless": endless, "/declared": declared})
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"too large: the body passed the cap of 1000000 bytes") as caught:
        fetch_url(f"{site.url}/endless", FetchPolicy(allow_private=True, max_bytes=1_000_000))
    assert time.monotonic() - start < 5 and f"{site.url}/endless" in str(caught.value)
    online.setenv("TTE_FLASH_ALLOW_PRIVATE_URLS", "1")
    online.setenv("TTE_FLASH_URL_MAX_BYTES", "5000")
    with pytest.raises(FetchError, match=r"Content-Length 10000000000 bytes is over the cap of 5000 bytes"):
        load_image(f"{site.url}/declared")


def test_offline_switches(server, monkeypatch):
    """TTE_FLASH_OFFLINE=1 fetches nothing; unset, HF_HUB_OFFLINE=1 counts as offline; TTE_FLASH_OFFLINE=0
    fetches in spite of it."""
    site = server({"/img.png": lambda r: send(r, png_bytes())})
    url = f"{site.url}/img.png"
    monkeypatch.setenv("TTE_FLASH_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for setting in ("1", None):
        if setting is None:
            monkeypatch.delenv("TTE_FLASH_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("TTE_FLASH_OFFLINE", setting)
        with pytest.raises(FetchError, match=rf"cannot fetch {url}: URL fetching is off"):
            load_image(url)
    assert site.hits == {}
    monkeypatch.setenv("TTE_FLASH_OFFLINE", "0")
    assert load_image(url).size == (23, 17)


def test_bad_bodies_and_settings_give_a_reason(server, online):
    """Never 'cannot load image ...: ' with nothing after it."""
    site = server({"/text": lambda r: send(r, b"<html>not an image</html>"),
                   "/empty": lambda r: send(r, b"")})
    online.setenv("TTE_FLASH_ALLOW_PRIVATE_URLS", "1")
    for path in ("/text", "/empty"):
        with pytest.raises(ValueError, match=rf"cannot read image {site.url}{path}: \S") as caught:
            load_image(site.url + path)
        assert not str(caught.value).rstrip().endswith(":")
    with pytest.raises(FetchError, match="only http:// and https://"):
        fetch_url("ftp://example.com/x.png", ALLOW)
    with pytest.raises(FetchError, match="cannot resolve"):
        fetch_url("http://no-such-host.invalid/x.png", ALLOW)
    online.setenv("TTE_FLASH_URL_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="TTE_FLASH_URL_TIMEOUT='soon'"):
        load_image(f"{site.url}/text")


# ---------------------------------------------------------------------------------------- data paths

@pytest.fixture
def root(tmp_path):
    """An image root with images/a.png, and files outside it: a secret and an image next to the root."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "images" / "a.png")
    (tmp_path / "secret.txt").write_text("password")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "outside.png")
    return data


@pytest.mark.parametrize("row_path", ["../secret.txt", "images/../../secret.txt", "ABSOLUTE"])
def test_paths_outside_the_root_are_refused(root, row_path):
    row_path = str(root.parent / "secret.txt") if row_path == "ABSOLUTE" else row_path
    with pytest.raises(ValueError, match="outside the image root") as caught:
        resolve_media(root, row_path)
    assert repr(row_path) in str(caught.value) and str(root) in str(caught.value)
    assert "allow_outside_root" in str(caught.value)
    assert resolve_media(root, row_path, allow_outside_root=True).endswith("secret.txt")


def test_paths_inside_the_root_resolve_as_before(root):
    assert resolve_media(root, "images/a.png") == str(root / "images" / "a.png")
    assert resolve_media(str(root) + "/", "images/../images/a.png") == str(root) + "/images/../images/a.png"
    assert resolve_media(root, str(root / "images" / "a.png")) == str(root / "images" / "a.png")  # absolute, inside
    assert resolve_media(None, str(root.parent / "secret.txt")).endswith("secret.txt")  # no root: as given
    with pytest.raises(FileNotFoundError, match="media file not found"):
        resolve_media(root, "images/b.png")


def test_a_symlink_does_not_smuggle_dotdot_out(root, tmp_path):
    """``link/..`` is the parent of the link's target for the OS: a row cannot walk out of the root through a
    symlink inside it, while a symlinked folder inside the root still works."""
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(elsewhere / "b.png")
    (root / "link").symlink_to(elsewhere)
    (tmp_path / "elsewhere" / "other.txt").write_text("x")
    assert resolve_media(root, "link/b.png") == str(root / "link" / "b.png")
    with pytest.raises(ValueError, match="outside the image root"):
        resolve_media(root, "link/../other.txt")


def test_rows_carry_the_switch(root):
    bad = str(root.parent / "outside.png")
    train_row = {"qry": "q", "qry_image_path": "images/a.png", "pos_text": "p", "pos_image_path": bad}
    eval_row = {"qry_text": "q", "qry_img_path": bad, "tgt_text": ["a"], "tgt_img_path": [""]}
    for build, row in ((train_example, train_row), (eval_example, eval_row)):
        with pytest.raises(ValueError, match="outside the image root"):
            build(row, root)
        build(row, root, allow_outside_root=True)
    assert make_input("t", bad, image_root=root, allow_outside_root=True)["image"] == bad


def test_evaluate_and_train_options(root, tmp_path):
    """``evaluate(..., allow_outside_image_root=True)`` / ``--allow_outside_image_root`` and the training
    argument of the same name."""
    from transformers import HfArgumentParser

    from tte_flash.evaluate import _inputs, main
    from tte_flash.training import DataArguments
    bad = str(root.parent / "outside.png")
    rows = [{"qry_text": "q", "qry_img_path": "images/a.png", "tgt_text": ["a", "b"], "tgt_img_path": [bad, ""]}]
    with pytest.raises(ValueError, match="evaluation row 1: .*outside the image root"):
        _inputs(rows, root)
    queries, documents, _ = _inputs(rows, root, allow_outside_root=True)
    assert documents[0]["image"] == bad
    (data_args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--train_data", "x.jsonl", "--allow_outside_image_root"])
    assert data_args.allow_outside_image_root
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    assert main(["--model", "tiny", "--data", str(path), "--image_root", str(root), "--no_shortcut"]) == 2
    assert main(["--model", "tiny", "--data", str(path), "--image_root", str(root), "--no_shortcut",
                 "--allow_outside_image_root", "--output", str(tmp_path / "out.json")]) == 0
    assert np.isfinite(json.loads((tmp_path / "out.json").read_text())["runs"][0]["metrics"]["hit@1"])
