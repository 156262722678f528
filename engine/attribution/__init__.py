"""Stage 3, attribution: trakview's implementations of traker's extension points for CLIP.

traker 0.3.2's stock CLIP pipeline has defects on CPU and for CLIP in general (README, "How the
scores are computed"); rather than fork it, trakview plugs its own classes into ``trak.TRAKer``:
the model output (``margin``), per-sample gradients (``gradients``), the projection
(``projection``), the score computer (``scoring``) and a saver over arrays in memory (``saver``).
``settings`` holds ``BuildConfig``, the settings that make a run's scores what they are.

Named ``attribution`` so it never shadows the third-party ``trak`` package.
May import: ``engine.errors``, ``engine.models`` (and torch, traker). No file I/O here.
"""
