"""trakview's Streamlit dashboard (thin: it calls `engine` and draws)."""
