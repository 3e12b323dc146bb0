"""mosec: a decode stage (2 processes) in front of a batching inference stage (1 process), its
own dynamic batching (`max_batch_size`, `max_wait_time`); mosec hands workers the raw body."""

from __future__ import annotations

import os
import sys

import numpy as np
from mosec import Server, ValidationError, Worker

from common import Model, decode, input_size, multipart_file, settings

CONF = settings()


class Decode(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.size = input_size(CONF["ir"])

    def deserialize(self, data: bytes) -> bytes:
        return data

    def forward(self, body: bytes) -> np.ndarray:
        try:
            return decode(multipart_file(body), self.size)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class Infer(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.model = Model(CONF["ir"], CONF["labels"])

    def forward(self, images: list[np.ndarray]) -> list[dict]:
        return [self.model.answer(p) for p in self.model(np.stack(images))]


def main() -> None:
    os.environ.setdefault("MOSEC_PORT", str(CONF["port"]))
    os.environ.setdefault("MOSEC_ADDRESS", "127.0.0.1")
    sys.argv = sys.argv[:1]
    server = Server()
    server.append_worker(Decode, num=2, route="/predict")
    server.append_worker(Infer, num=1, max_batch_size=CONF["batch"], max_wait_time=int(CONF["delay_ms"]),
                         route="/predict")
    server.run()


if __name__ == "__main__":
    main()
