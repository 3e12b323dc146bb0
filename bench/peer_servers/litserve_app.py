"""LitServe: one LitAPI with its own batching (`max_batch_size`, `batch_timeout`); LitServe hands
`decode_request` the parsed multipart form. Decoding runs in the inference worker, LitServe's way."""

from __future__ import annotations

import litserve as ls
import numpy as np

from common import Model, failure, settings

CONF = settings()


class Classifier(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = Model(CONF["ir"], CONF["labels"])

    def decode_request(self, request) -> np.ndarray | Exception:
        try:
            return self.model.decode(request["image"].file.read())
        except ValueError as exc:
            return exc

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, inputs: list) -> list:
        good = [x for x in inputs if isinstance(x, np.ndarray)]
        probs = iter(self.model(np.stack(good)) if good else [])
        return [next(probs) if isinstance(x, np.ndarray) else x for x in inputs]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output) -> dict:
        return failure(str(output)) if isinstance(output, Exception) else self.model.answer(output)


def main() -> None:
    api = Classifier(max_batch_size=CONF["batch"], batch_timeout=CONF["delay_ms"] / 1000, api_path="/predict")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=CONF["port"], generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
