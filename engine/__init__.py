"""trakview's engine: data, CLIP models and training, TRAK attribution, indexes, queries, exports.

Nothing in this package imports Streamlit; the dashboard calls into it.
"""

__version__ = "0.1.0"
