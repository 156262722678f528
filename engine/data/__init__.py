"""Stage 1, data: image–caption pairs from the formats users have, to tensors for a model.

Owns: pair lists (``pairs``), opening images and query images (``images``), the source formats
csv / jsonl / COCO / image folder / WebDataset (``sources``), streaming preprocessed batches
(``loading``) and the demo world (``synthetic``).

May import: ``engine.errors``, ``engine.files`` (and torch, PIL, numpy). Nothing else of trakview.
"""
