"""Training metrics: JSONL (one object per line), TensorBoard, and a console progress bar."""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

from tqdm import tqdm


class MetricWriter:
    """Writes scalar metrics to `workdir/metrics.jsonl` and TensorBoard event files."""

    def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {
            "step": int(step),
            "time": time.time(),
            **{k: _scalar(v) for k, v in metrics.items()},
        }
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _scalar(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def progress_bar(total: int, initial: int, enabled: bool = True) -> tqdm:
    """A tqdm bar with ETA; disabled in non-interactive logs unless asked for."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
        unit="step",
        smoothing=0.1,
    )
