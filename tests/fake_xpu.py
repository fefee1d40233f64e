"""A stand-in for ``torch.xpu`` in the Ray worker processes of a machine without an Intel GPU.

It fakes only the device boundary: ``install`` (a Ray ``worker_process_setup_hook``) puts a
``FakeXpu`` where ``torch.xpu`` is, in every worker of the job, before any user code runs.
Like Level Zero, the fake reads the device mask once, at the process's first XPU call, and
from then on shows the devices it named (all of the node's when there is none). It records
that first call, with the mask and selector it saw and the Ray node it ran on, as
``<pid>.json`` in ``$FAKE_XPU_RECORD_DIR``: what a test needs to tell whether a replica was
restricted to its tile before it touched the runtime.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

RECORD_DIR_ENV = "FAKE_XPU_RECORD_DIR"
DEVICES_PER_NODE_ENV = "FAKE_XPU_DEVICES_PER_NODE"
DEVICE_NAME = "Intel(R) Data Center GPU Max 1550"


class FakeXpu:
    """The part of ``torch.xpu`` the serving code calls."""

    def __init__(self) -> None:
        self._devices: list[int] | None = None  # fixed at the first call, as Level Zero does
        self._current = 0

    def _visible(self, call: str) -> list[int]:
        if self._devices is None:
            mask = os.environ.get("ZE_AFFINITY_MASK")
            node_devices = int(os.environ.get(DEVICES_PER_NODE_ENV, "2"))
            self._devices = ([int(i) for i in mask.split(",")] if mask
                             else list(range(node_devices)))
            self._record(call, mask)
        return self._devices

    @staticmethod
    def _record(call: str, mask: str | None) -> None:
        import ray

        record_dir = os.environ.get(RECORD_DIR_ENV)
        if not record_dir:
            return
        record = {"pid": os.getpid(), "call": call, "ZE_AFFINITY_MASK": mask,
                  "ONEAPI_DEVICE_SELECTOR": os.environ.get("ONEAPI_DEVICE_SELECTOR"),
                  "node_id": ray.get_runtime_context().get_node_id()}
        (Path(record_dir) / f"{os.getpid()}.json").write_text(json.dumps(record))

    def is_available(self) -> bool:
        return bool(self._visible("is_available"))

    def device_count(self) -> int:
        return len(self._visible("device_count"))

    def set_device(self, ordinal: int) -> None:
        if not 0 <= ordinal < len(self._visible("set_device")):
            raise RuntimeError(f"invalid device ordinal {ordinal}")
        self._current = ordinal

    def current_device(self) -> int:
        self._visible("current_device")
        return self._current

    def get_device_properties(self, ordinal: int) -> SimpleNamespace:
        if not 0 <= ordinal < len(self._visible("get_device_properties")):
            raise RuntimeError(f"invalid device ordinal {ordinal}")
        return SimpleNamespace(name=DEVICE_NAME, total_memory=64 << 30)


def install() -> None:
    """Ray's worker_process_setup_hook: torch.xpu becomes a FakeXpu in this process."""
    import torch

    fake = FakeXpu()
    torch.xpu = fake  # type: ignore[assignment]
    sys.modules["torch.xpu"] = fake  # type: ignore[assignment]
