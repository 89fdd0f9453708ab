"""Evaluation: what every runtime measures about its models, in one place.

Models are evaluated as rows of a (B, d) matrix in batched calls (StackedModule), whether B is
one node process, all nodes of a Node engine or a chunk of the vectorized engine's nodes. For
large networks `eval.nodes` and `eval.test_samples` fix a seeded sample of nodes and test examples
so that evaluation never dominates a round; the metrics record the sample sizes used.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from .algorithms.robust import recall_per_class
from .config import EvalConfig
from .data import Dataset
from .params import StackedModule
from .seeding import EVAL_STREAM, round_seed

CHUNK_BYTES = 64 << 20  # float64 scratch per chunk of rows in consensus_distance
MODEL_SAMPLES = 8192  # model-sample pairs per batched evaluation call



def consensus_distance(vectors: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """(1/n) sum_i ||x_i - mean x||^2, accumulated in float64 over chunks of rows, so it needs no
    float64 copy of all n vectors (at N = 100 a fresh stack once cost more than training)."""
    chunks = list(_chunks(vectors))
    n = sum(len(c) for c in chunks)
    mean = sum(c.double().sum(dim=0) for c in chunks) / n
    return float(sum(((c.double() - mean) ** 2).sum() for c in chunks) / n)


def _chunks(vectors: torch.Tensor | Sequence[torch.Tensor]):
    if isinstance(vectors, torch.Tensor):
        step = max(1, CHUNK_BYTES // (8 * vectors.shape[1]))
        yield from vectors.split(step)
    else:
        step = max(1, CHUNK_BYTES // (8 * vectors[0].numel()))
        for start in range(0, len(vectors), step):
            yield torch.stack(list(vectors[start:start + step]))


class Evaluator:
    """Test accuracy of nodes' models on the (sampled) global test set and on each node's own test
    slice, the average model's accuracy, and the consensus distance."""

    def __init__(self, stacked: StackedModule, dataset: Dataset, local_parts: list[np.ndarray], cfg: EvalConfig,
                 seed: int, device: torch.device | str = "cpu", population: Sequence[int] | None = None):
        """`population`: the nodes whose models count (the honest ones; default all)."""
        self.population = np.arange(len(local_parts)) if population is None else np.asarray(population)
        n = len(self.population)
        rng = np.random.default_rng(round_seed(seed, EVAL_STREAM))
        self.nodes = np.sort(self.population[rng.choice(n, cfg.nodes, replace=False)] if 0 < cfg.nodes < n
                             else self.population)
        tests = len(dataset.y_test)
        test_index = (np.sort(rng.choice(tests, cfg.test_samples, replace=False))
                      if 0 < cfg.test_samples < tests else np.arange(tests))
        self.stacked, self.batch, self.inputs = stacked, cfg.batch_size, dataset.normalise
        self.local_x, self.local_y = dataset.test_stored.to(device), dataset.y_test.to(device)
        if len(test_index) == tests:  # the whole test set: no second copy of it
            self.x, self.y = self.local_x, self.local_y
        else:
            self.x, self.y = self.local_x[torch.from_numpy(test_index)], self.local_y[torch.from_numpy(test_index)]
        self.local_parts = [torch.from_numpy(p).to(device) for p in local_parts]

    @torch.inference_mode()
    def accuracy(self, matrix: torch.Tensor) -> torch.Tensor:
        """(B,) accuracy of each row's model on the (sampled) global test set."""
        correct = torch.zeros(matrix.shape[0], dtype=torch.long, device=matrix.device)
        for index, models in self._model_chunks(matrix):
            for start in range(0, len(self.y), self.batch):
                x, y = self.inputs(self.x[start:start + self.batch]), self.y[start:start + self.batch]
                correct[index] += (self.stacked(models, x, shared=True).argmax(dim=2) == y).sum(dim=1)
        return correct.cpu().double() / len(self.y)

    @torch.inference_mode()
    def local_accuracy(self, matrix: torch.Tensor, nodes: Sequence[int]) -> torch.Tensor:
        """(B,) accuracy of row b's model on node nodes[b]'s own test slice (NaN for an empty slice)."""
        out = torch.full((matrix.shape[0],), float("nan"), dtype=torch.float64)
        for index, models in self._model_chunks(matrix):
            parts = [self.local_parts[nodes[b]] for b in index.tolist()]
            lengths = torch.tensor([len(p) for p in parts], device=matrix.device)
            padded = pad_sequence(parts, batch_first=True)  # (b, longest), padded with index 0
            hits = torch.zeros(len(parts), dtype=torch.long, device=matrix.device)
            for start in range(0, padded.shape[1], self.batch):
                idx = padded[:, start:start + self.batch]
                real = torch.arange(start, start + idx.shape[1], device=idx.device)[None, :] < lengths[:, None]
                right = self.stacked(models, self.inputs(self.local_x[idx])).argmax(dim=2) == self.local_y[idx]
                hits += (right & real).sum(dim=1)
            out[index] = torch.where(lengths > 0, hits / lengths.clamp_min(1), float("nan")).cpu().double()
        return out

    def _model_chunks(self, matrix: torch.Tensor):
        """(row indices, rows) in chunks small enough that one chunk's activations on one test batch
        stay within a few hundred MB (MODEL_SAMPLES model-sample pairs per call)."""
        step = max(1, MODEL_SAMPLES // self.batch)
        for start in range(0, matrix.shape[0], step):
            yield torch.arange(start, min(start + step, matrix.shape[0]), device=matrix.device), matrix[start:start + step]

    def evaluate(self, vectors: torch.Tensor) -> dict[str, Any]:
        """The metrics of one evaluated round from all n nodes' vectors (n, d): of the population's
        models (sampled per eval.nodes), their average model and their consensus distance."""
        sample = vectors[torch.from_numpy(self.nodes).to(vectors.device)]
        acc = self.accuracy(sample)
        local = self.local_accuracy(sample, self.nodes.tolist())
        members = vectors if len(self.population) == len(vectors) else \
            vectors[torch.from_numpy(self.population).to(vectors.device)]
        average = self.accuracy(members.mean(dim=0, keepdim=True))
        return {"accuracy_mean": float(acc.mean()), "accuracy_min": float(acc.min()),
                "accuracy_max": float(acc.max()), "accuracy_average_model": float(average[0]),
                "accuracy_local_mean": float(np.nanmean(local.numpy())) if bool((~local.isnan()).any()) else None,
                "consensus_distance": consensus_distance(members),
                "eval_nodes": len(self.nodes), "eval_test_samples": len(self.y)}


class ValidationRecall:
    """Bristle's recall(nodes, models): the recall of each model on each class of its node's
    validation split (NaN for a class absent there), all models of a batch in one batched call."""

    def __init__(self, stacked: StackedModule, inputs: torch.Tensor, labels: torch.Tensor,
                 validation_parts: list[np.ndarray]):
        self.stacked = stacked
        parts = [torch.from_numpy(p) for p in validation_parts]
        self.index = pad_sequence(parts, batch_first=True)  # (N, L) sample indices, padded with 0
        self.labels = torch.where(torch.arange(self.index.shape[1])[None, :] < torch.tensor([len(p) for p in parts])[:, None],
                                  labels[self.index], -1)  # -1 marks padding
        self.inputs = inputs

    @torch.inference_mode()
    def __call__(self, nodes: torch.Tensor, models: torch.Tensor) -> torch.Tensor:
        b, m = models.shape[:2]
        nodes = nodes.cpu()
        x = self.inputs[self.index[nodes].to(self.inputs.device)]  # (B, L, ...)
        x = x[:, None].expand(b, m, *x.shape[1:]).flatten(0, 1)
        labels = self.labels[nodes].to(models.device)[:, None].expand(b, m, -1).flatten(0, 1)
        return recall_per_class(self.stacked(models.flatten(0, 1), x), labels).view(b, m, -1)


def suspects(observations: dict[tuple[int, int], tuple[int, float]], threshold: float,
             attackers: Sequence[int] = ()) -> dict[str, Any]:
    """Who misbehaved, from what honest nodes saw: `observations[(observer, sender)]` = (messages
    received, summed suspicion). Each observer's rate for a sender (mean suspicion per message) is
    taken relative to that observer's typical sender (the median of its rates, m): (rate - m) /
    (1 - m), floored at 0, since some filters discard a share of every neighbour (a trimmed mean
    trims honest values too). A sender's score is the mean of that over its observers; those at
    or above `threshold` are suspected. With the attackers known (an evaluation run), the
    precision and recall of that list."""
    rates: dict[int, dict[int, float]] = {}
    for (observer, sender), (messages, suspicion) in observations.items():
        if messages:
            rates.setdefault(observer, {})[sender] = suspicion / messages
    excess: dict[int, list[float]] = {}
    for seen in rates.values():
        typical = float(np.median(list(seen.values())))
        for sender, rate in seen.items():
            excess.setdefault(sender, []).append(max(0.0, rate - typical) / (1 - typical) if typical < 1 else 0.0)
    scores = {s: float(np.mean(v)) for s, v in excess.items()}
    suspected = sorted((s for s, score in scores.items() if score >= threshold), key=lambda s: (-scores[s], s))
    report: dict[str, Any] = {"suspected": [{"node": s, "score": round(scores[s], 4)} for s in suspected],
                              "suspicion_scores": {str(s): round(v, 4) for s, v in sorted(scores.items())}}
    if attackers:
        hits = len(set(suspected) & set(attackers))
        report.update(suspects_precision=hits / len(suspected) if suspected else None,
                      suspects_recall=hits / len(attackers))
    return report
