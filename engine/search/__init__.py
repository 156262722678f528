"""Stage 5, search: faiss indexes of a run's TRAK vectors and CLIP embeddings.

Owns: index construction, recall measurement and search on arrays (``faiss_ops``), and the run's
indexes under ``RUN/index/`` (``run_indexes``), built by the build and used by the explorers.

May import: ``engine.errors``, ``engine.files``, ``engine.run`` (and faiss, numpy).
"""
