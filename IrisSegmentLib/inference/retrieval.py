"""Object-level retrieval: per class, the references whose embeddings best match the target's own.

Similarity is the cosine between flattened class embeddings. A pool small enough is scanned
exactly with one matrix product; a large one (thousands of class embeddings) is searched with an
HNSW index when hnswlib is installed (it is optional: inside Slicer the exact scan is used).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..embeddings import TaskEmbedding, class_key
from ..errors import InputError

ANN_THRESHOLD = 2048  # class embeddings per class key above which an HNSW index pays off


class ReferencePool:
    """Encoded references, indexed per class (matched by terminology, else name, else value)."""

    def __init__(self, tasks: list[TaskEmbedding]) -> None:
        if not tasks:
            raise InputError("the reference pool is empty: add at least one encoded reference.")
        self.tasks = tasks
        self._ensemble = TaskEmbedding.ensemble(tasks)  # also checks one model and one modality
        self.modality = self._ensemble.modality
        self.members: dict[str, list[tuple[int, int]]] = {}
        for t_index, task in enumerate(tasks):
            for row, value in enumerate(task.label_values):
                self.members.setdefault(class_key(value, task.segments.get(value, {})), []).append((t_index, row))
        self._vectors = {key: F.normalize(torch.stack([tasks[t].tokens[r].flatten() for t, r in rows]), dim=1) for key, rows in self.members.items()}
        self._indexes: dict[str, object] = {}

    def ensemble(self) -> TaskEmbedding:
        return self._ensemble

    def closest(self, query: TaskEmbedding, top_k: int = 1) -> TaskEmbedding:
        """Per class of `query`, the mean of the `top_k` most similar pool embeddings of that class;
        everything else (label values, names, colors, thresholds, island flags) is the pool ensemble's."""
        chosen_rows = []
        for value in query.label_values:
            key = class_key(value, query.segments.get(value, {}))
            if key not in self.members:
                continue
            vector = F.normalize(query.tokens[query.label_values.index(value)].flatten(), dim=0)
            best = self._search(key, vector, min(top_k, len(self.members[key])))
            tokens = torch.stack([self.tasks[t].tokens[r] for t, r in (self.members[key][i] for i in best)]).mean(0)
            chosen_rows.append((key, tokens))
        if not chosen_rows:
            return self._ensemble
        keys = {class_key(v, self._ensemble.segments.get(v, {})): i for i, v in enumerate(self._ensemble.label_values)}
        tokens = self._ensemble.tokens.clone()
        for key, tok in chosen_rows:
            tokens[keys[key]] = tok
        e = self._ensemble
        return replace(e, tokens=tokens, label_values=list(e.label_values), segments=dict(e.segments), sources=[*e.sources, "retrieval"],
                       counts=list(e.counts), thresholds=list(e.thresholds), keep_largest=list(e.keep_largest))

    def _search(self, key: str, vector: torch.Tensor, k: int) -> list[int]:
        vectors = self._vectors[key]
        if len(vectors) >= ANN_THRESHOLD:
            index = self._hnsw(key)
            if index is not None:
                labels, _ = index.knn_query(vector.numpy()[None], k=k)
                return [int(i) for i in labels[0]]
        return torch.topk(vectors @ vector, k).indices.tolist()

    def _hnsw(self, key: str):
        if key not in self._indexes:
            try:
                import hnswlib
            except ImportError:
                self._indexes[key] = None
                return None
            vectors = self._vectors[key].numpy()
            index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
            index.init_index(max_elements=len(vectors), ef_construction=200, M=16, random_seed=0)
            index.add_items(vectors, list(range(len(vectors))))
            index.set_ef(max(64, 4 * 16))
            self._indexes[key] = index
        return self._indexes[key]
