"""A plain-loop float64 ASMK (Tolias, Avrithis, Jegou 2013, with the binarised residuals and
selectivity of jenicek/asmk, ``asmk/kernel.py``), to check the batched ``gpu_dsm.asmk`` against:
one feature, one word, one image at a time."""
import math

import numpy as np


def _nearest(x, codebook, count):
    dists = [float(((x - c) ** 2).sum()) for c in codebook]
    return sorted(range(len(codebook)), key=lambda w: (dists[w], w))[:count]


def aggregate(descriptors, image_ids, codebook, count):
    """``{image: {word: residual sum}}`` with each feature added to its ``count`` nearest words.

    ``descriptors``: ``(F, d)`` array-like (computed in float64); ``image_ids``: ``F`` integers;
    ``codebook``: ``(K, d)`` array-like. Residual sums are ``(d,)`` float64 numpy arrays."""
    vectors = {}
    for x, image in zip(np.asarray(descriptors, dtype=np.float64), image_ids):
        words = vectors.setdefault(int(image), {})
        for w in _nearest(x, np.asarray(codebook, dtype=np.float64), count):
            words[w] = words.get(w, 0.0) + (x - codebook[w])
    return vectors


def _code(v, binary):
    if binary:
        return np.where(v > 0, 1.0, -1.0)
    return v / (np.linalg.norm(v) + 1e-6)


def scores(codebook, db_descriptors, db_ids, num_images, q_descriptors, q_ids, num_queries,
           db_assignments=1, q_assignments=5, binary=True, alpha=3.0, tau=0.0):
    """``(num_queries, num_images)`` float64 numpy array of ASMK scores, normalised by
    sqrt(|C_X|) sqrt(|C_Q|). Descriptors ``(F, d)`` and the codebook ``(K, d)`` are array-likes
    (computed in float64), the ids sequences of integers, as `aggregate` takes them."""
    codebook = np.asarray(codebook, dtype=np.float64)
    d = codebook.shape[1]
    db = aggregate(db_descriptors, db_ids, codebook, db_assignments)
    qs = aggregate(q_descriptors, q_ids, codebook, q_assignments)
    out = np.zeros((num_queries, num_images))
    for q in range(num_queries):
        query = qs.get(q, {})
        for i in range(num_images):
            image = db.get(i, {})
            if not query or not image:
                continue
            total = 0.0
            for w, v in query.items():
                if w not in image:
                    continue
                a, b = _code(v, binary), _code(image[w], binary)
                s = float(a @ b) / d if binary else float(a @ b)
                if s >= tau:
                    total += math.copysign(abs(s) ** alpha, s)
            out[q, i] = total / (math.sqrt(len(image)) * math.sqrt(len(query)))
    return out
