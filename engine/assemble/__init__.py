"""Stage 6, assemble (what ``trakview build`` runs): computes a run directory from pairs,
checkpoints and settings (resumable).

Owns: the graph of units over shards (``graph``), what each unit computes (``units``, sharing a
``context.WorkContext`` per process), the executors that run them here or on Ray
(``executors``), the pairs stage (``pairs``), the derived arrays (``derive``) and the
orchestration that ends with the manifest (``orchestrate.build``).

May import: ``engine.errors``, ``engine.files``, ``engine.parallel``, ``engine.data``,
``engine.models``, ``engine.attribution``, ``engine.run``, ``engine.search``.

Not named ``build``: ignore files and code-structure tools take a folder of that name for build
output (``.gitignore``'s ``build/`` once hid this package from git).
"""
