"""INFERSTACK_PRECISION=auto on OpenVINO: the measured choice, and auto int8 started behind it."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
from inferstack.config import Settings

from . import live_int8
from . import openvino_runtime as ovr
from . import precision_choice as pc
from .classifier import Classifier

log = logging.getLogger("inferstack.worker")

ModelFor = Callable[[str], Any]  # precision (fp32 | int8) -> ov.Model, converted or read from the cache


def load_auto(settings: Settings, name: str, labels: list[str], model_for: ModelFor, key: str | None) -> Classifier:
    """The classifier at the fastest measured precision; ``key`` names the float model (cache key)."""
    float_model = model_for("fp32")
    shape = ovr.input_shape_of(float_model)
    live_xml, live_body = live_int8.cached(settings.cache_dir, key) if settings.auto_int8 else (None, None)
    if live_xml is not None and live_body is not None and not settings.calibration_dir:
        return _serve_live_int8(settings, name, labels, shape, live_xml, live_body)
    int8_model = model_for("int8") if settings.calibration_dir else None
    candidates = ovr.device_precisions() + (["int8"] if int8_model is not None else [])

    def compile_one(precision: str) -> tuple[pc.Call, str]:
        return ovr.compile_call(int8_model if precision == "int8" else float_model, precision, settings.cache_dir,
                                settings.inference_threads)

    parts = {"model": key, "calibration": bool(settings.calibration_dir), "cpu": ovr.device_name(),
             "candidates": candidates, "batch_size": settings.batch_size,
             "threads": settings.inference_threads}  # timings depend on the threads the model gets
    decision = pc.decision_key(parts) if key else None
    choice = pc.read_decision(settings.cache_dir, decision)
    if choice is None:
        choice, call = pc.measure(compile_one, candidates, shape, settings.batch_size, settings.precision_trials)
        pc.write_decision(choice, settings.cache_dir, decision, parts)
    else:
        call, _ = compile_one(choice.chosen)
    runs = next(t.runs for t in choice.trials if t.precision == choice.chosen)
    clf = Classifier(name, labels, shape, call, runtime="openvino", precision=runs, choice={"auto": choice.info()},
                     threads=ovr.threads_of(call))
    if settings.auto_int8:
        _start_auto_int8(settings, clf, float_model, choice.chosen, key, live_body)
    return clf


def _serve_live_int8(settings: Settings, name: str, labels: list[str], shape: tuple[int, int, int], xml: Any,
                     body: dict[str, Any]) -> Classifier:
    """A previous run switched to int8 (it agreed and ran faster): serve it at once, no new measurement."""
    import openvino as ov

    log.info("auto int8: serving the int8 model a previous run switched to (%s): %s", xml, body["reason"])
    call, _ = ovr.compile_call(ov.Core().read_model(xml), "int8", settings.cache_dir, settings.inference_threads)
    auto = {"chosen": "int8", "measured": False, "trials": body.get("trials", [])}
    live = {"state": live_int8.SWITCHED, "from_cache": True, **{k: body[k] for k in ("top1", "top5", "reason")}}
    return Classifier(name, labels, shape, call, runtime="openvino", precision="int8",
                      choice={"auto": auto, "auto_int8": live}, threads=call.threads)


def _start_auto_int8(settings: Settings, clf: Classifier, float_model: Any, chosen: str, key: str | None,
                     previous: dict[str, Any] | None) -> None:
    status: dict[str, Any] = {}
    clf.choice["auto_int8"] = status
    if chosen == "int8":
        status.update(state=live_int8.SWITCHED, reason="int8 from the calibration folder measured fastest")
        return
    if previous is not None and not previous.get("ok"):
        # This model and library versions were already tried here: the same answer would come back.
        status.update(state=live_int8.REJECTED, from_cache=True, reason=previous["reason"])
        log.warning("auto int8: staying in %s: %s", chosen, previous["reason"])
        return
    if not key:
        log.info("auto int8: random weights are not cached; the int8 model will not outlive this process")
    reservoir = live_int8.Reservoir(settings.auto_int8_samples)
    clf.reservoir = reservoir

    def switch(int8_model: Any) -> None:
        call, _ = ovr.compile_call(int8_model, "int8", settings.cache_dir, settings.inference_threads)
        call(np.zeros((settings.batch_size, *clf.input_shape), np.float32))  # allocate before serving
        clf.switch(call, "int8")

    live_int8.LiveInt8(float_model, chosen, reservoir, status, switch, cache_dir=settings.cache_dir, key=key,
                       min_top1=settings.auto_int8_top1, min_top5=settings.auto_int8_top5,
                       batch_size=settings.batch_size, trials=settings.precision_trials,
                       threads=settings.inference_threads).start()
