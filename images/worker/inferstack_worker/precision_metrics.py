"""Prometheus view of the precision choice: what serves now, what auto measured, where auto int8 is.

A collector reads the classifier at scrape time, so a switch to int8 shows without extra plumbing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .classifier import Classifier


class PrecisionCollector(Collector):
    def __init__(self, classifier: Classifier, model: str) -> None:
        self.classifier = classifier
        self.model = model

    def collect(self) -> Iterator[Any]:
        clf, choice = self.classifier, self.classifier.choice
        serving = GaugeMetricFamily("inferstack_model_precision_info", "The runtime and precision serving now (1)",
                                    labels=["model", "runtime", "precision"])
        serving.add_metric([self.model, clf.runtime, clf.precision], 1)
        yield serving
        measured = GaugeMetricFamily("inferstack_precision_measured_images_per_second",
                                     "precision auto: each candidate's timed throughput at the batch size",
                                     labels=["model", "precision", "runs", "chosen"])
        auto = choice.get("auto") or {}
        for row in auto.get("trials", []):
            measured.add_metric([self.model, row["precision"], row["runs"], str(row["precision"] == auto["chosen"]).lower()],
                                row["images_per_s"])
        yield measured
        live = choice.get("auto_int8")
        if live:
            state = GaugeMetricFamily("inferstack_auto_int8_state", "auto int8: its state (1); the reason is in the "
                                      "model info", labels=["model", "state"])
            state.add_metric([self.model, live.get("state", "")], 1)
            yield state
            agreement = GaugeMetricFamily("inferstack_auto_int8_agreement_percent",
                                          "auto int8: agreement of int8 with float on the live inputs",
                                          labels=["model", "measure"])
            for measure in ("top1", "top5"):
                if measure in live:
                    agreement.add_metric([self.model, measure], live[measure])
            yield agreement
