"""Stage 9, curate: act on what the attributions show.

Owns: named baskets of training pairs kept in the run directory (``baskets``: one small JSON
file per basket, saved atomically under a lock, with who added each pair, when and why), the
selections that fill them (``select``: suspects, the most harmful pairs, score thresholds, text
and column filters, id files), the predicted effect of removing a basket (``effect``: TRAK's
linear datamodel), growing a basket from what its pairs share (``grow``), and the cleaned
training set in the source's own format (``source`` finds and reads the run's source,
``cleaned`` writes and checks the cleaned copy).

May import: ``errors``, ``files``, ``data``, ``attribution``, ``run``, ``search``, ``explore``,
``explain``.
"""
