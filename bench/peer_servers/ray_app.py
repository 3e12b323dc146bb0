"""Ray Serve: one replica, batching with `@serve.batch`, a FastAPI ingress taking the multipart
upload; decode and the model call run in threads so the replica's event loop keeps accepting."""

# No `from __future__ import annotations`: FastAPI must see `UploadFile` itself, and through Ray's
# class wrapping it cannot resolve the string the future import leaves (PydanticUserError, 500).
import asyncio
import os
import signal
import threading

import numpy as np
import ray
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse
from ray import serve

from common import Model, failure, settings

CONF = settings()
app = FastAPI()


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
@serve.ingress(app)
class Classifier:
    def __init__(self, ir: str, labels: str) -> None:
        self.model = Model(ir, labels)

    @serve.batch(max_batch_size=CONF["batch"], batch_wait_timeout_s=CONF["delay_ms"] / 1000)
    async def infer(self, images: list[np.ndarray]) -> list[dict]:
        probs = await asyncio.to_thread(self.model, np.stack(images))
        return [self.model.answer(p) for p in probs]

    @app.post("/predict")
    async def predict(self, image: UploadFile = File(...)) -> JSONResponse:
        data = await image.read()
        try:
            pixels = await asyncio.to_thread(self.model.decode, data)
        except ValueError as exc:
            return JSONResponse(failure(str(exc)), status_code=400)
        return JSONResponse(await self.infer(pixels))


def main() -> None:
    # Ray's agents start slowly on a busy 2-core machine; its 30 s default then aborts the start.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": CONF["port"]})
    serve.run(Classifier.bind(CONF["ir"], CONF["labels"]), route_prefix="/", blocking=False)
    print("ready", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
