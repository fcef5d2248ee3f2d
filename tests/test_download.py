"""The downloader against a local HTTP server on 127.0.0.1 (no network needed)."""

import hashlib
import http.server
import os
import socket
import threading

import pytest

from mian_jax.data import download
from mian_jax.errors import DataError

CONTENT = bytes(range(256)) * 9000  # 2.3 MB: several read chunks


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves FILES; honours "Range: bytes=N-" unless the server's ignore_range is set."""

  def do_GET(self):  # noqa: N802
    server = self.server
    server.requests.append((self.path, self.headers.get("Range")))
    body = server.files.get(self.path)
    if body is None:
      self.send_error(404)
      return
    start = 0
    range_header = self.headers.get("Range")
    if range_header and not server.ignore_range:
      start = int(range_header.split("=")[1].rstrip("-"))
      if start >= len(body):
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(body)}")
        self.end_headers()
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    else:
      self.send_response(200)
    self.send_header("Content-Length", str(len(body) - start))
    self.end_headers()
    self.wfile.write(body[start:])

  def log_message(self, *args):
    pass


class _Server(http.server.ThreadingHTTPServer):
  def handle_error(self, request, client_address):
    pass  # a client that gives up early (size mismatch) breaks the pipe: expected


@pytest.fixture
def server():
  httpd = _Server(("127.0.0.1", 0), _Handler)
  httpd.files = {"/data.bin": CONTENT}
  httpd.requests = []
  httpd.ignore_range = False
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
  yield httpd
  httpd.shutdown()
  httpd.server_close()


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


SHA = hashlib.sha256(CONTENT).hexdigest()


def test_full_download_verifies_and_leaves_no_part(server, tmp_path):
  target = str(tmp_path / "sub" / "data.bin")
  assert download.download(server.url + "/data.bin", target, size=len(CONTENT), sha256=SHA,
                           progress=False) == target
  assert open(target, "rb").read() == CONTENT
  assert not os.path.exists(target + ".part")
  assert server.requests == [("/data.bin", None)]


def test_existing_file_is_kept_without_a_request(server, tmp_path):
  target = tmp_path / "data.bin"
  target.write_bytes(CONTENT)
  download.download(server.url + "/data.bin", str(target), sha256=SHA)
  assert server.requests == []


def test_resume_uses_range_and_appends(server, tmp_path):
  target = str(tmp_path / "data.bin")
  with open(target + ".part", "wb") as f:
    f.write(CONTENT[:12345])
  download.download(server.url + "/data.bin", target, sha256=SHA, progress=False)
  assert server.requests == [("/data.bin", "bytes=12345-")]
  assert open(target, "rb").read() == CONTENT
  assert not os.path.exists(target + ".part")


def test_resume_restarts_when_server_ignores_range(server, tmp_path):
  server.ignore_range = True
  target = str(tmp_path / "data.bin")
  with open(target + ".part", "wb") as f:
    f.write(b"garbage that must not stay at the front")
  download.download(server.url + "/data.bin", target, sha256=SHA, progress=False)
  assert open(target, "rb").read() == CONTENT


def test_complete_part_file_is_finished_on_416(server, tmp_path):
  target = str(tmp_path / "data.bin")
  with open(target + ".part", "wb") as f:
    f.write(CONTENT)
  download.download(server.url + "/data.bin", target, sha256=SHA, progress=False)
  assert open(target, "rb").read() == CONTENT


def test_checksum_mismatch_raises_and_removes_part(server, tmp_path):
  target = str(tmp_path / "data.bin")
  with pytest.raises(DataError, match="sha256"):
    download.download(server.url + "/data.bin", target, sha256="0" * 64, progress=False)
  assert not os.path.exists(target)
  assert not os.path.exists(target + ".part")


def test_size_mismatch_raises(server, tmp_path):
  with pytest.raises(DataError, match="bytes"):
    download.download(server.url + "/data.bin", str(tmp_path / "d"), size=10, progress=False)


def test_http_error_names_url(server, tmp_path):
  with pytest.raises(DataError, match="HTTP 404") as e:
    download.download(server.url + "/missing.bin", str(tmp_path / "m"), progress=False)
  assert server.url + "/missing.bin" in str(e.value)


def test_unreachable_names_url_and_target_in_one_line(tmp_path):
  url = f"http://127.0.0.1:{_closed_port()}/reviews.json.gz"
  target = str(tmp_path / "raw" / "reviews.json.gz")
  with pytest.raises(DataError) as e:
    download.download(url, target, timeout=5)
  message = str(e.value)
  assert url in message and target in message and "\n" not in message
  assert not os.path.exists(target)


def test_ensure_files_lists_every_failed_file(server, tmp_path):
  port = _closed_port()
  files = [(server.url + "/data.bin", str(tmp_path / "ok.bin")),
           (f"http://127.0.0.1:{port}/a.gz", str(tmp_path / "a.gz")),
           (f"http://127.0.0.1:{port}/b.gz", str(tmp_path / "b.gz"))]
  with pytest.raises(DataError) as e:
    download.ensure_files(files, timeout=5, progress=False)
  message = str(e.value)
  for url, target in files[1:]:
    assert url in message and target in message
  assert "\n" not in message
  assert open(tmp_path / "ok.bin", "rb").read() == CONTENT  # the reachable one still arrived
