"""A Google Cloud Storage emulator on loopback (the `gcp-storage-emulator` package), for the
gs:// tests: started in a subprocess, its environment for gcsfs and tensorstore, stopped after.

The emulator keeps objects in a folder of its own; tests give it a fresh one, so nothing outside
the test sees its buckets.

One gap of the emulator is filled here (`python -m kandinsky_fixtures.gcs_emulator` runs it
patched): its media downloads carry no `x-goog-generation` header, which GCS always sends.
tensorstore reads the generation from that header and uses it as the precondition of its next
write of the object (orbax's OCDBT manifests are read-modify-written), so without it the second
write of a checkpoint's manifest fails with "Malformed StorageGeneration".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BUCKET = "kandinsky-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """One emulator process. `env` points gcsfs (STORAGE_EMULATOR_HOST) and tensorstore
    (TENSORSTORE_GCS_HTTP_URL, through which orbax writes arrays) at it."""

    def __init__(self, data_dir: Path, bucket: str = BUCKET):
        self.bucket = bucket
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "kandinsky_fixtures.gcs_emulator"]
        self.log = Path(data_dir) / "emulator.log"
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*command, "-d", str(Path(data_dir) / "data"), "start", "--port", port]
                + ["--default-bucket", bucket, "-q"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the GCS emulator exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the GCS emulator did not answer in {timeout:.0f} s")

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # gcsfs's zonal/HNS probe speaks gRPC, which the emulator does not: it would wait
            # 60 s per bucket before falling back to JSON
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "test",
            # the emulator serves one request at a time: fsspec's default burst of concurrent
            # range reads (a cached batch) drops connections and retries for seconds
            "FSSPEC_GCS": '{"batch_size": 4}',
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> GcsEmulator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _serve() -> None:
    """The emulator's command line, with media downloads that name the object's generation."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return plain_download(request, response, storage, *args, **kwargs)

    objects.download = download  # before the server module builds its route table from it
    from gcp_storage_emulator.__main__ import main

    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    _serve()
