"""Stage 2 in a long-lived process: three fits in a row of one head, as ``compare``, ``audit`` or a test run
fit many heads in one process (``heads_speed.py`` times one fit per fresh process). The first fit pays the
process's imports and first calls. ``CHECKOUT`` is the featx tree to time, so two trees run alternately:

    python benchmarks/heads_warm.py CHECKOUT svm 2 400     # clf, classes, images (1,280-d)
"""
import sys
import time

import numpy as np

sys.path.insert(0, sys.argv[1])
import featx  # noqa: E402

assert featx.__file__.startswith(sys.argv[1]), featx.__file__
from featx import heads  # noqa: E402

clf, classes, n, dim = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), 1280
rng = np.random.default_rng(0)  # heads_speed.py's generator: sparse non-negative centres plus noise, clipped at 0
centres = np.abs(rng.normal(0, 1, (classes, dim))) * (rng.random((classes, dim)) < 0.1)
y = rng.permutation(np.arange(n) % classes)
X = np.maximum(centres[y] + rng.normal(0, 3.0, (n, dim)), 0).astype(np.float32)
seconds = []
for _ in range(3):
    started = time.perf_counter()
    heads.make_head(clf, device="cpu").fit(X, y)
    seconds.append(time.perf_counter() - started)
print(sys.argv[1], clf, f"{classes}x{n}", " ".join(f"{s:.2f}" for s in seconds))
