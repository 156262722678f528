"""trakview's engine: why does a CLIP model match an image and a caption? TRAK answers with the
training data.

The packages follow the pipeline, and imports only point down it (a test checks it):

==============  ============================================================================
``errors``       the one error hierarchy (``TrakviewError``)
``files``        atomic file I/O; ``parallel``: worker processes on this machine
``data``         image–caption pairs: sources, images, streaming, the demo world
``models``       CLIP models, checkpoints, embeddings, the trainer
``attribution``  traker's extension points for CLIP: margin, gradients, projection, scoring
``run``          the run directory: every path, the manifest, run.toml
``search``       faiss indexes of a run
``build``        the build: graph of units, executors, derived arrays, orchestration
``explore``      reading a run: stored and new queries, exports, the dashboard's backend
``evaluate``     counterfactual checks: LDS, removal, ground truth
``demo``         the embedded default: world, ensemble, run
``cli``          the ``trakview`` command
==============  ============================================================================

Nothing in this package imports Streamlit; the dashboard calls into it.
"""

__version__ = "0.1.0"
