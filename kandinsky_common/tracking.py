"""Experiment tracking without a framework: tensorboard event files (no TensorFlow) or wandb.

The torch backend uses accelerate's trackers; the flax backend uses this, with the same tags
(`train_loss`, `lr`, `validation`) so runs of both backends compare in one tensorboard.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np

from kandinsky_common.errors import UserError
from kandinsky_common.storage import is_url, location, upload_folder

UPLOAD_SECONDS = 60.0  # how stale the bucket's copy of the events may get


class Tracker:
    """Scalars and images to tensorboard and/or wandb, from the main process only."""

    def __init__(self, report_to: str, logging_dir: str | Path, project: str, config: dict):
        self._tb = None
        self._wandb = None
        if report_to in ("tensorboard", "all"):
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._remote, self._uploaded = None, 0.0
            if is_url(logging_dir):
                # gcsfs cannot append, and tensorboard's writer appends at every flush: write the
                # events locally and copy the file to the bucket now and then and at the end
                self._remote = str(logging_dir)
                self._staging = tempfile.TemporaryDirectory(prefix="kandinsky-events-")
                logging_dir = self._staging.name
            location(logging_dir).mkdir(parents=True, exist_ok=True)
            self._tb = EventFileWriter(str(logging_dir))
        if report_to in ("wandb", "all"):
            try:
                import wandb
            except ImportError as e:
                if report_to == "wandb":
                    raise UserError("--report_to wandb needs `pip install wandb`") from e
            else:
                self._wandb = wandb.init(project=project, config=config)
        if report_to == "comet_ml":
            raise UserError(
                "--report_to comet_ml is not supported by this backend; use tensorboard"
            )

    def _event(self, step: int, values) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._tb.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        if self._remote is not None and time.monotonic() - self._uploaded > UPLOAD_SECONDS:
            self._upload()

    def _upload(self) -> None:
        self._tb.flush()
        upload_folder(Path(self._staging.name), self._remote)
        self._uploaded = time.monotonic()

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            self._event(
                step, [Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
            )
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def images(self, tag: str, images, step: int) -> None:
        """images: PIL images, logged as `tag/i` PNGs."""
        if self._tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = []
            for i, im in enumerate(images):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                h, w = np.asarray(im).shape[:2]
                png = Summary.Image(encoded_image_string=buf.getvalue(), height=h, width=w)
                values.append(Summary.Value(tag=f"{tag}/{i}", image=png))
            self._event(step, values)
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: [wandb.Image(im) for im in images]}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            if self._remote is not None:
                upload_folder(Path(self._staging.name), self._remote)
                self._staging.cleanup()
        if self._wandb is not None:
            self._wandb.finish()
