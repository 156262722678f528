"""Stage 2, models: CLIP models by name, their checkpoint files, embeddings and the trainer.

Owns: building an open_clip architecture with its preprocessing and tokenizer (``factory``),
reading, checking and writing checkpoints (``checkpoints``), unit embeddings and the CLIP margin
of the TRAK paper (``embed``), and training an ensemble of checkpoints (``train``).

May import: ``engine.errors``, ``engine.files``, ``engine.parallel``, ``engine.data``.
"""
