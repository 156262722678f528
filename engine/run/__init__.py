"""Stage 4, the run directory: the product's contract between the build, the dashboard and a
user's notebook.

Owns: every path of a run (``layout.RunLayout``; no other module spells a run file name), the
manifest (``manifest.Manifest``, read and written only here), the flags a run was built with
(``invocation``: ``run.toml``) and its health (``health``: retrieval against chance).

May import: ``engine.errors``, ``engine.files``, ``engine.models``, ``engine.attribution``.
"""
