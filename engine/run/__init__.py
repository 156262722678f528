"""Stage 4, the run directory: the product's contract between the build, the dashboard and a
user's notebook.

Owns: every path of a run (``layout.RunLayout``; no other module spells a run file name), the
manifest (``manifest.Manifest``, read and written only here) and the flags a run was built with
(``invocation``: ``run.toml``).

May import: ``engine.errors``, ``engine.files``, ``engine.attribution.settings``.
"""
