"""Stage 7, explore: reading a finished run to answer "why does the model match this pair?".

Owns: a run's stored results (``run_data.RunData``: a validation pair's influencers), new
queries computed exactly as the build scored its targets (``query.QueryEngine``), the results
they return (``results``), gallery exports (``export``, ``sheet``) and the dashboard's backend
(``view.RunView``: thumbnails, PCA map, totals, search; no Streamlit).

May import: everything below it (``errors``, ``files``, ``data``, ``models``, ``attribution``,
``run``, ``search``); never ``engine.assemble``.
"""
