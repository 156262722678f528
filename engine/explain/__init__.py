"""Stage 8, explain: from validation pairs that fail to the training pairs behind them.

Owns: groups of validation pairs chosen by a rule (``groups``: ids, a caption search, a CLIP
search, a column value, the failing pairs, a region of the map), their aggregated effect and how
concentrated it is (``aggregate``), what the top training pairs share (``describe``: caption
words, column values, visual clusters), and the matches a failing pair makes instead of its own
with the training pairs that drive them (``confusion``).

May import: everything below it (``errors``, ``files``, ``data``, ``models``, ``attribution``,
``run``, ``search``, ``explore``); never ``engine.assemble``.
"""
