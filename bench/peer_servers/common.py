"""What every peer server shares, so they differ only in their serving and batching: the same
OpenVINO IR compiled as our worker compiles it, the same decode, the same answer shape.

Runs in the peers' own environment (bench/peer_servers/.venv): numpy, Pillow, OpenVINO and the peer;
`inferstack.imaging` needs only numpy and Pillow, so it is imported from the checkout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from inferstack.imaging import BadImage, decode_image  # noqa: E402

# What the driver (bench/peers.py) tells each server.
IR_ENV = "PEER_IR"
LABELS_ENV = "PEER_LABELS"
PORT_ENV = "PEER_PORT"
BATCH_ENV = "PEER_BATCH"
DELAY_MS_ENV = "PEER_DELAY_MS"
PRECISION_HINT_ENV = "PEER_PRECISION_HINT"  # OpenVINO's INFERENCE_PRECISION_HINT, as our worker sets it
TOP_K = 5


def settings() -> dict[str, Any]:
    return {"ir": os.environ[IR_ENV], "labels": os.environ[LABELS_ENV], "port": int(os.environ[PORT_ENV]),
            "batch": int(os.environ.get(BATCH_ENV, "32")), "delay_ms": float(os.environ.get(DELAY_MS_ENV, "5"))}


def input_size(ir: str) -> tuple[int, int]:
    """The model's (height, width), read from the IR without compiling it."""
    import openvino as ov

    shape = ov.Core().read_model(ir).inputs[0].get_partial_shape()
    return shape[1].get_length(), shape[2].get_length()


def decode(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Upload bytes -> float32 (h, w, 3), as our web tier and worker prepare them."""
    return decode_image(data, size).astype(np.float32)


class Model:
    """The IR compiled with our worker's settings (LATENCY hint: one stream on every core)."""

    def __init__(self, ir: str, labels: str) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if os.environ.get(PRECISION_HINT_ENV):
            config["INFERENCE_PRECISION_HINT"] = os.environ[PRECISION_HINT_ENV]
        self.compiled = core.compile_model(core.read_model(ir), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.size = input_size(ir)
        self.labels = Path(labels).read_text().splitlines()
        self(np.zeros((1, *self.size, 3), np.float32))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
        return self.request.get_output_tensor(0).data.copy()

    def decode(self, data: bytes) -> np.ndarray:
        return decode(data, self.size)

    def answer(self, probs: np.ndarray) -> dict[str, Any]:
        idx = np.argsort(-probs)[:TOP_K]
        return {"success": True,
                "predictions": [{"label": self.labels[i], "probability": float(probs[i])} for i in idx]}


def failure(message: str) -> dict[str, Any]:
    return {"success": False, "error": message}


def multipart_file(body: bytes) -> bytes:
    """The first file of a multipart/form-data body; its first line names the boundary (for peers
    whose handlers see the raw body only)."""
    boundary, _, rest = body.partition(b"\r\n")
    if not boundary.startswith(b"--"):
        raise BadImage("not a multipart body")
    _, sep, data = rest.partition(b"\r\n\r\n")
    end = data.find(b"\r\n" + boundary)
    if not sep or end < 0:
        raise BadImage("truncated multipart body")
    return data[:end]

