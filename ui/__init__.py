"""Thin Streamlit helpers shared by app.py and every page (no computation here; that is vizlib)."""
